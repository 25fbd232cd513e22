"""Hypothesis strategies for hostile inputs, shared by the suite's fuzz tests
(test_safetensors_reader.py, test_reliability.py) and the longer run of ``tools/fuzz_inputs.py``.

- ``headers``: safetensors JSON headers — tensor entries with good and bad dtypes, shapes and
  offsets (negative, huge, wrong types) mixed with arbitrary JSON values;
- ``JUNK`` with ``plan_paths``/``mutate``: replace 1-3 values anywhere in a valid plan dict.
"""

from __future__ import annotations

from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "F8_E4M3", "I64", "XX", 1]),
        "shape": st.lists(st.integers(-2, 40), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-10, 2**66), min_size=0, max_size=3) | json_values,
    }
)
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=6)

JUNK = st.one_of(st.none(), st.integers(-5, 10**12), st.text(max_size=8), st.lists(st.integers(-2, 5), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.booleans(), st.floats())


def mutate(d, path: list, value) -> None:
    """Set ``d[path[0]][path[1]]... = value``."""
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value


def plan_paths(d, prefix=()):
    """Every key path of a nested dict/list (the first 3 items of each list)."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield (*prefix, k)
            yield from plan_paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d[:3]):
            yield (*prefix, i)
            yield from plan_paths(v, (*prefix, i))
