"""ComfyUI "scaled fp8" files: a ``scaled_fp8`` marker tensor and, per fp8 layer, an f32
``<layer>.scale_weight`` (newer files: ``<layer>.weight_scale``); the effective weight is
``fp8_weight.float() * scale``. ``<layer>.scale_input`` is for fp8 activations and is ignored.
The scales are taken out of the key set before the layout is recognised and put back on the
mapped weights (``MappedTensor.scale``); the WeightStore hands such a weight to the kernels as a
``PackedWeight`` that applies the scale in the panel decode (never a full-size copy)."""

from __future__ import annotations

from dataclasses import replace

from ..errors import LayoutError
from .refs import MappedTensor, StoredTensor, TensorRef

MARKER = "scaled_fp8"
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
#: fp8 matrices a scaled file may leave unscaled: token embeddings (ComfyUI scales Linear layers only)
_UNSCALED_OK = ("shared.weight", "embed_tokens.weight", "token_embedding.weight", "position_embedding.weight")


def split_scales(tensors: dict[str, StoredTensor], path: str
                 ) -> tuple[dict[str, StoredTensor], dict[str, StoredTensor], list[str]]:
    """(the tensors without scale keys, stored weight key -> its scale, keys ignored). Refuses a
    scale that is not one f32 value (or one per row), and — in a file with the marker — an fp8
    matrix without a scale."""
    rest: dict[str, StoredTensor] = {}
    scales: dict[str, StoredTensor] = {}
    ignored: list[str] = []
    for key, st in tensors.items():
        if key == MARKER or key.endswith(".scale_input"):
            ignored.append(key)
        elif key.endswith(_SCALE_SUFFIXES):
            layer = key[: -len(".scale_weight")]
            scales[layer + ".weight"] = st
        else:
            rest[key] = st
    for wkey, st in scales.items():
        w = rest.get(wkey)
        if w is None:
            raise LayoutError(path, f"scale {st.key!r} belongs to no weight ({wkey!r} is missing)")
        n = 1
        for s in st.shape:
            n *= s
        if st.dtype != "F32" or n not in (1, w.shape[0] if w.shape else 1):
            raise LayoutError(path, f"scale {st.key!r} must be one f32 value (or one per row), "
                                    f"not {st.dtype} {list(st.shape)}")
        if w.dtype != "F8_E4M3" or len(w.shape) != 2:
            raise LayoutError(path, f"scale {st.key!r} is for {wkey!r}, which is {w.dtype} {list(w.shape)}, "
                                    "not an fp8 e4m3 matrix")
    if MARKER in tensors:
        for key, st in rest.items():
            if (st.dtype == "F8_E4M3" and len(st.shape) == 2 and key not in scales
                    and not key.endswith(_UNSCALED_OK)):
                raise LayoutError(path, f"scaled fp8 file: layer {key!r} has no scale_weight")
    return rest, scales, ignored


def attach_scales(mapped: dict[str, MappedTensor], scales: dict[str, StoredTensor], path: str) -> None:
    """Put each stored weight's scale on the mapped tensors made from it (row ranges of a fused
    weight get their rows of a per-row scale), in place."""
    if not scales:
        return
    for name, mt in mapped.items():
        keys = {p.key for p in mt.parts}
        hit = keys & scales.keys()
        if not hit:
            continue
        st = scales[next(iter(hit))]
        per_row = st.shape not in ((), (1,))
        if len(mt.parts) > 1 and (per_row or len(keys) > 1):
            raise LayoutError(path, f"{name}: a weight assembled from several parts with per-row scales "
                                    "is not supported")
        rows = mt.parts[0].rows if per_row else None
        shape = ((rows[1] - rows[0]) if rows else st.shape[0],) if per_row else ()
        mapped[name] = replace(mt, scale=TensorRef(st.path, st.key, st.dtype, shape, rows))
