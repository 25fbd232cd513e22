"""The memory budget under a hard limit the OS enforces (issue #8): ``streamexec run`` inside a
memory cgroup limited to exactly ``--memory-budget`` completes with no OOM kill, page cache
included — the weight files and the runtime's own libraries are evicted from the page cache first,
so every page the run reads is charged to the group. And ``--memory-budget auto`` inside a group
picks the group's limit, also from inside a child group with no limit of its own (the smallest
limit on the hierarchy).

Needs root and a cgroup memory controller (v2 ``memory.max`` where the unified hierarchy has one,
else v1 ``memory.limit_in_bytes``); skipped with the reason otherwise. Only the files this run uses
are evicted (``POSIX_FADV_DONTNEED``), not the whole machine's cache; set
``STREAMEXEC_TEST_DROP_CACHES=1`` to ``echo 3 > /proc/sys/vm/drop_caches`` as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cgroup import CgroupUnavailable, MemoryCgroup, evict_from_page_cache, resident_pages
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
#: The demo plan's smallest budget is ~201 MiB (``streamexec plan DEMO --memory-budget min``): run
#: a little above it, with the cgroup limit equal to the budget.
BUDGET = 224 * MIB

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux-only")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    scratch = tmp_path_factory.mktemp("tmp")
    env = dict(os.environ, STREAMEXEC_CACHE=str(cache), TMPDIR=str(scratch))
    res = subprocess.run([sys.executable, "-c", "from streamexec.pipelines.demo import ensure_demo_model as e; "
                          "print(e())"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    env["DEMO_MODEL"] = res.stdout.strip()
    return env


def cgroup(limit: int) -> MemoryCgroup:
    try:
        return MemoryCgroup.create(limit)
    except CgroupUnavailable as e:
        pytest.skip(f"no memory cgroup here: {e}")


def runtime_files(env: dict) -> list[Path]:
    """Every file a warm streamexec process maps (interpreter, numpy/numba/llvmlite libraries,
    compiled kernels from the Numba cache): on a cold machine these are charged too."""
    code = ("import PIL.Image, streamexec.cli, streamexec.run, streamexec.pipelines.generate; "
            "import streamexec.runtime.process as p; p.warm_up_kernels(); print(open('/proc/self/maps').read())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    paths = set()
    for line in res.stdout.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/") and os.path.isfile(parts[5]):
            paths.add(Path(parts[5]))
    return sorted(paths)


def cold_start(env: dict) -> str:
    """Evict the demo model's files and the runtime's mapped files from the page cache (pages that
    another live process maps stay: they are shared and charged to it)."""
    if os.environ.get("STREAMEXEC_TEST_DROP_CACHES") == "1":
        subprocess.run(["sync"], check=False)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3")
        except OSError as e:
            pytest.skip(f"cannot drop the page cache: {e.strerror}")
    model = [p for p in Path(env["DEMO_MODEL"]).rglob("*") if p.is_file()]
    libs = runtime_files(env)
    evict_from_page_cache(model + libs)
    left = sum(max(0, resident_pages(p)) for p in model)
    left_libs = sum(max(0, resident_pages(p)) for p in libs)
    return (f"evicted {len(model)} model files ({left / MIB:.1f} MiB still cached) and {len(libs)} runtime files "
            f"({left_libs / MIB:.1f} MiB still cached: mapped by other processes)")


def report(stats, note: str) -> str:
    reached = stats.max_usage >= stats.limit - MIB  # then the kernel reclaimed page cache to stay under it
    return (f"cgroup v{stats.version} limit {stats.limit / MIB:.0f} MiB: max usage {stats.max_usage / MIB:.1f} MiB "
            f"(page cache and kernel memory included; limit {'reached' if reached else 'not reached'}), OOM kills "
            f"{stats.oom_kill}, page cache charged at exit {stats.page_cache / MIB:.1f} MiB; {note}")


@pytest.mark.slow
def test_run_completes_inside_a_cgroup_limited_to_the_budget(env: dict, tmp_path: Path) -> None:
    group = cgroup(BUDGET)
    out = tmp_path / "demo.png"
    try:
        note = cold_start(env)
        res = group.run([sys.executable, "-m", "streamexec", "run", "plans/demo.yaml", "--prompt", "a lighthouse",
                         "--steps", "4", "--memory-budget", f"{BUDGET // MIB}M", "-o", str(out)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        stats = group.stats()
    finally:
        group.remove()
    print(report(stats, note))
    print(res.stdout.strip().splitlines()[0] if res.stdout.strip() else "")
    assert stats.oom_kill == 0, f"OOM-killed inside a {BUDGET // MIB} MiB cgroup: {report(stats, note)}"
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}\n{report(stats, note)}"
    assert res.stderr.splitlines()[0].endswith(f"budget {BUDGET / MIB:.2f} MiB")
    with Image.open(out) as im:
        assert im.size == (256, 256) and "Steps: 4" in im.text["parameters"]
    assert 0 < stats.max_usage <= BUDGET  # the kernel's own count: anonymous memory + page cache + kernel memory
    assert stats.page_cache > 0  # the weights and libraries read were charged to the group


@pytest.mark.slow
def test_auto_budget_inside_a_cgroup_is_the_limit_minus_the_margin(env: dict, tmp_path: Path) -> None:
    limit = 512 * MIB
    group = cgroup(limit)
    out = tmp_path / "auto.png"
    try:
        probe = group.run([sys.executable, "-c", "from streamexec.memlimit import auto_budget, memory_limit; "
                           "print(*memory_limit(), auto_budget(), sep='|')"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        res = group.run([sys.executable, "-m", "streamexec", "run", "plans/demo.yaml", "--prompt", "x", "--steps", "2",
                         "--memory-budget", "auto", "-o", str(out)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        stats = group.stats()
    finally:
        group.remove()
    assert probe.returncode == 0, probe.stderr[-2000:]
    seen, source, auto = probe.stdout.strip().split("|")
    assert int(seen) == limit and source.startswith("cgroup limit") and group.path.name in source
    expected = limit - max(64 * MIB, limit // 10)
    assert int(auto) == expected
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.splitlines()[0].endswith(f"budget {expected / MIB:.2f} MiB")  # 448.00 MiB
    assert out.is_file() and stats.oom_kill == 0


@pytest.mark.slow
def test_auto_budget_inside_a_child_group_sees_the_parents_limit(env: dict) -> None:
    """A parent group with a limit, a child without one: a process in the child is held to the
    parent's limit, and ``auto`` plans for it (v1 ``hierarchical_memory_limit``, v2 the parent's
    ``memory.max``)."""
    limit = 384 * MIB
    parent = cgroup(limit)
    child = None
    try:
        try:
            child = parent.child()
        except CgroupUnavailable as e:
            pytest.skip(f"no child memory cgroup here: {e}")
        probe = child.run([sys.executable, "-c", "from streamexec.memlimit import auto_budget, cgroup_limits, "
                           "memory_limit; print(*memory_limit(), auto_budget(), sep='|'); print(cgroup_limits())"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        own = (child.path / ("memory.max" if child.version == 2 else "memory.limit_in_bytes")).read_text().strip()
    finally:
        if child is not None:
            child.remove()
        parent.remove()
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert own == "max" or int(own) > limit  # the child has no limit of its own
    first, limits = probe.stdout.strip().splitlines()
    seen, source, auto = first.split("|")
    assert int(seen) == limit, limits
    assert source.startswith("cgroup limit") and parent.path.name in source
    if child.version == 1:
        assert source.endswith("memory.stat: hierarchical_memory_limit)")
    else:
        assert source == f"cgroup limit ({parent.path / 'memory.max'})"
    assert int(auto) == limit - max(64 * MIB, limit // 10)
    print(f"cgroup v{child.version}: child of a {limit // MIB} MiB group sees {source}; "
          f"auto = {int(auto) / MIB:.0f} MiB")
