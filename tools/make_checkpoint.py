#!/usr/bin/env python3
"""Write seeded random-weight checkpoints of SD 1.5 / FLUX.1 components in the layouts people have,
streaming tensor by tensor to disk (peak RAM ~ one 4 MiB chunk over the interpreter + torch).

    python tools/make_checkpoint.py ARCH OUT (--preset NAME | --config PATH) [--layout L] [--dtype D]
                                    [--seed S] [--shard-size 5GB] [--variant fp16] [--set [COMP.]KEY=VALUE]

ARCH: ``unet`` (UNet2DConditionModel), ``vae`` (AutoencoderKL, 4- or 16-channel), ``clip``
(CLIPTextModel), ``flux`` (FluxTransformer2DModel), ``t5`` (T5EncoderModel), or ``all`` (every
component of the preset/pipeline config; for ``--layout pipeline`` and the SD 1.5 ``ldm`` file).
The pipeline component names (``transformer``, ``text_encoder``, ``text_encoder_2``) work too.

Layouts (``--layout``, default ``diffusers``):

- ``diffusers``: a component folder, ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (``model.safetensors`` for the text encoders), sharded with an index json like
  ``save_pretrained`` when ``--shard-size`` is given. CLIP keys keep the ``text_model.`` prefix
  and T5 stores only ``shared.weight``, as the published FLUX/SD folders do.
- ``pipeline``: ``model_index.json`` + one such folder per component, plus the preset's
  ``scheduler/`` and CLIP ``tokenizer/`` files copied from the reference configs.
- ``bfl``: ``flux1-schnell.safetensors`` / ``flux1-dev.safetensors`` (fused ``qkv`` and
  ``linear1``) for ``flux``; ``ae.safetensors`` for ``vae``.
- ``ldm``: an SD 1.5 single file (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.*``) with ``all`` or one of ``unet``/``vae``/``clip``.
- ``comfy``: ComfyUI text encoders, ``clip_l.safetensors`` (``clip``) and
  ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors`` (``t5``).

OUT is the folder to create (``diffusers``, ``pipeline``), or for the single-file layouts a
``.safetensors`` path or a folder that gets the usual file name. Output is atomic (a hidden
partial file/folder renamed at the end); an existing OUT needs ``--force``.

Presets: ``sd15``, ``flux-schnell``, ``flux-dev`` (the real configs shipped in ``streamexec/configs``,
or ``$STREAMEXEC_REFERENCE``) and ``tiny-sd15``, ``tiny-flux-schnell``, ``tiny-flux-dev`` (the same
structure at test size; the tiny CLIP keeps the real 49408-token vocabulary). ``--config`` takes a
diffusers/transformers ``config.json``, a component folder or a pipeline folder.

Examples::

    python tools/make_checkpoint.py flux /tmp/ckpt --preset flux-schnell --layout bfl --dtype bf16
    python tools/make_checkpoint.py t5 /tmp/ckpt --preset flux-schnell --layout comfy --dtype fp8_e4m3
    python tools/make_checkpoint.py all /tmp/sd15 --preset sd15 --layout pipeline --dtype fp16
    python tools/make_checkpoint.py all /tmp/v1-5.safetensors --preset sd15 --layout ldm --dtype fp16
    python tools/make_checkpoint.py flux /tmp/tr --preset flux-dev --shard-size 5GB --variant bf16
    python tools/make_checkpoint.py unet /tmp/u --config my_unet/config.json --set layers_per_block=1
    python tools/make_checkpoint.py all /tmp/p --preset tiny-flux-dev --layout pipeline \\
        --set transformer.num_layers=2 --dry-run

Values. Every tensor is named as diffusers/transformers name it (the internal names of
``streamexec.weights.layouts``), and its values depend only on (seed, component, internal name):
element ``i`` lies in chunk ``i // CHUNK`` of the flattened tensor, and each chunk is drawn from
``numpy.random.PCG64(blake2b(f"{seed}\\0{component}\\0{name}\\0{chunk}"))`` as uniform floats
scaled to the tensor's role (:func:`value_range`): weight matrices and convolutions
U(±sqrt(3/fan_in)) (std 1/sqrt(fan_in), like torch's default init, so activations stay O(1) through
a full-size model), embeddings std 1, norm scales 1 ± 0.1, biases ± 0.02. So any tensor can be
regenerated alone (:func:`tensor_values`), and the same seed gives the same weights in every
layout: a BFL file and a diffusers folder of the same seed hold the same model. Values are made
in f32 and rounded to the stored dtype (round to nearest even; torch's casts for bf16/fp8).

dtype. ``--dtype`` applies to every tensor; ``--small-dtype`` optionally stores the 1-D tensors
(norm scales, biases) in another dtype. fp8 default: everything fp8, as ComfyUI's
``t5xxl_fp8_e4m3fn.safetensors`` has it (its listings show ``layer_norm.weight F8_E4M3``, and its
size, 4.89 GB, is one byte per parameter). Its ``t5xxl_fp16`` sibling is 9.79 GB, i.e. the
4.76 B parameters plus a second 32128x4096 embedding: the ``comfy`` T5 file stores both
``shared.weight`` and ``encoder.embed_tokens.weight`` (tied: equal values).

Memory (2-core VM, other jobs running): writing the full FLUX.1-schnell transformer as a BFL bf16
file (23.8 GB) took 128 s with a peak RSS of 367 MiB; the full SD 1.5 UNet in fp16 (1.7 GB) peaked
at 360 MiB; merely importing torch + diffusers + transformers peaks at 348 MiB.

Names and shapes come from the library itself: the diffusers/transformers model is built on the
``meta`` device (no memory) and its ``state_dict()`` gives the internal names. Original-format key
sets (LDM, BFL) come from ``tests/layout_keys.py`` (generators validated against diffusers'
single-file converters in ``tests/test_layouts.py``), and the stored-key -> internal-name relation
is obtained by running ``streamexec.weights.layouts`` forward on the planned key set and inverting
it, so this tool renames nothing itself; before writing it checks that the planned file maps to
exactly the library's names and shapes. Needs torch, diffusers and transformers (the test extra).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamexec.errors import StreamexecError
from streamexec.weights.checkpoint import CLASS_TO_COMPONENT
from streamexec.weights.dtypes import DTYPES
from streamexec.weights.layouts import detect_layout, map_component
from streamexec.weights.refs import MappedTensor, StoredTensor
from streamexec.weights.writer import PendingTensor, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
#: Elements per generation chunk (part of the value definition: changing it changes the values).
CHUNK = 1 << 20

ARCHS = {
    "unet": "unet", "vae": "vae", "clip": "text_encoder", "flux": "transformer", "t5": "text_encoder_2",
    "transformer": "transformer", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
}  # fmt: skip
#: component -> (library, class) as model_index.json names them.
LIBRARY_CLASS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "transformer": ("diffusers", "FluxTransformer2DModel"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
}
DTYPE_TAGS = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "fp8_e4m3": "F8_E4M3", "fp8_e5m2": "F8_E5M2"}
#: safetensors' own order inside a file: dtypes from the largest (its enum order), then names.
_SAVE_ORDER = {"F32": 0, "BF16": 1, "F16": 2, "F8_E4M3": 3, "F8_E5M2": 4}
LAYOUTS: dict[str, tuple[str, ...]] = {
    "diffusers": tuple(LIBRARY_CLASS),
    "pipeline": tuple(LIBRARY_CLASS),
    "bfl": ("transformer", "vae"),
    "ldm": ("unet", "vae", "text_encoder"),
    "comfy": ("text_encoder", "text_encoder_2"),
}
#: Wrapper prefix of each component inside an SD 1.5 LDM single file.
LDM_PREFIX = {
    "unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer.",
}  # fmt: skip


class ToolError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------ values


def value_range(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(centre, half-width) of the uniform distribution of one internal tensor."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return 0.0, 0.02
    if len(shape) <= 1:  # LayerNorm/GroupNorm/RMSNorm scales (``weight``, BFL ``scale``)
        return 1.0, 0.1
    if name.endswith(("embedding.weight", "shared.weight", "embed_tokens.weight", "relative_attention_bias.weight")):
        return 0.0, math.sqrt(3.0)
    fan_in = math.prod(shape[1:])
    return 0.0, math.sqrt(3.0 / fan_in)


def _chunk_seed(seed: int, component: str, name: str, chunk: int) -> int:
    h = hashlib.blake2b(f"{seed}\0{component}\0{name}\0{chunk}".encode(), digest_size=16)
    return int.from_bytes(h.digest(), "little")


def _pieces(numel: int, start: int, stop: int) -> Iterator[tuple[int, int]]:
    """[start, stop) cut at chunk boundaries."""
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"range [{start}, {stop}) outside {numel} elements")
    pos = start
    while pos < stop:
        end = min((pos // CHUNK + 1) * CHUNK, stop)
        yield pos, end
        pos = end


def piece_values(seed: int, component: str, name: str, shape: tuple[int, ...], start: int, stop: int) -> np.ndarray:
    """Float32 values of elements [start, stop) of the flattened tensor; the range must lie inside
    one chunk (a fresh array)."""
    chunk = start // CHUNK
    lo, hi = chunk * CHUNK, min((chunk + 1) * CHUNK, math.prod(shape))
    if not lo <= start <= stop <= hi:
        raise ValueError(f"{name}: [{start}, {stop}) is not inside chunk {chunk}")
    centre, half = value_range(name, shape)
    rng = np.random.Generator(np.random.PCG64(_chunk_seed(seed, component, name, chunk)))
    a = rng.random(stop - lo, dtype=np.float32)[start - lo :]  # the stream up to ``stop`` is all we need
    a *= np.float32(2 * half)
    a += np.float32(centre - half)
    return a


def iter_values(
    seed: int, component: str, name: str, shape: tuple[int, ...], start: int = 0, count: int | None = None
) -> Iterator[np.ndarray]:
    """Float32 values of elements [start, start+count) of the flattened tensor, in pieces of at most
    CHUNK elements."""
    numel = math.prod(shape)
    stop = numel if count is None else start + count
    for lo, hi in _pieces(numel, start, stop):
        yield piece_values(seed, component, name, shape, lo, hi)


def tensor_values(seed: int, component: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The whole f32 tensor (for tests and small tensors; the writer never calls this)."""
    flat = np.concatenate(list(iter_values(seed, component, name, shape)) or [np.zeros(0, np.float32)])
    return flat.reshape(shape)


def encode(a: np.ndarray, tag: str) -> np.ndarray:
    """f32 values -> the stored representation of ``tag`` (round to nearest even)."""
    if tag == "F32":
        return a
    if tag == "F16":
        return a.astype(np.float16)
    import torch

    tdt = {"BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[tag]
    view = torch.int16 if tag == "BF16" else torch.uint8
    return torch.from_numpy(np.ascontiguousarray(a)).to(tdt).view(view).numpy()


# ------------------------------------------------------------------------------------ the library


@dataclass
class ComponentSpec:
    """One component: its config (as written) and the library's internal names and shapes."""

    component: str
    config: dict[str, Any]
    lib_config: Mapping[str, Any]
    shapes: dict[str, tuple[int, ...]]  # internal name -> shape, in state_dict order
    canonical: dict[str, str]  # internal name -> the name whose values it has (tied weights)

    @property
    def aliases(self) -> set[str]:
        return {k for k, v in self.canonical.items() if k != v}

    @property
    def params(self) -> int:
        return sum(math.prod(s) for k, s in self.shapes.items() if k not in self.aliases)


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def library_model(component: str, config: Mapping[str, Any]) -> Any:
    """The diffusers/transformers model of ``config`` on the meta device (shapes only)."""
    import torch

    _quiet_libraries()
    cfg = dict(config)
    with torch.device("meta"):
        if component in ("unet", "vae", "transformer"):
            import diffusers

            return getattr(diffusers, LIBRARY_CLASS[component][1]).from_config(cfg)
        import transformers

        if component == "text_encoder":
            return transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(cfg))
        return transformers.T5EncoderModel(transformers.T5Config.from_dict(cfg))


def component_spec(component: str, config: dict[str, Any]) -> ComponentSpec:
    try:
        model = library_model(component, config)
    except Exception as e:  # the libraries raise all kinds of errors for bad configs
        raise ToolError(f"{component}: the config does not build a {LIBRARY_CLASS[component][1]}: {e}") from None
    sd = model.state_dict()
    # streamexec's CLIP names keep ``text_model.`` (every published checkpoint has it; transformers
    # >= 5 dropped that module level and strips it on load).
    prefix = "text_model." if component == "text_encoder" and not any(k.startswith("text_model.") for k in sd) else ""
    shapes = {prefix + k: tuple(v.shape) for k, v in sd.items()}
    order = {k: i for i, k in enumerate(shapes)}
    canonical = {k: k for k in shapes}
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if prefix + n in order:
            groups.setdefault(id(p), []).append(prefix + n)
    for names in groups.values():
        names.sort(key=order.__getitem__)  # state_dict order: the first one is canonical
        for n in names[1:]:
            canonical[n] = names[0]
    return ComponentSpec(component, config, model.config, shapes, canonical)


def _layout_keys() -> Any:
    """``tests/layout_keys.py``: original-format key sets from a diffusers config."""
    mod = sys.modules.get("layout_keys")
    if mod is None:
        spec = importlib.util.spec_from_file_location("layout_keys", ROOT / "tests" / "layout_keys.py")
        if spec is None or spec.loader is None:
            raise ToolError(f"{ROOT / 'tests' / 'layout_keys.py'}: missing (needed for the ldm/bfl layouts)")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["layout_keys"] = mod
        spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------- configs


def reference_dir() -> Path:
    from streamexec.configs import REFERENCE_DIR

    return Path(os.environ.get("STREAMEXEC_REFERENCE") or REFERENCE_DIR)


@dataclass
class Source:
    """Where the configs come from: component configs plus pipeline extras."""

    name: str
    configs: dict[str, dict[str, Any]]
    model_index: dict[str, Any] | None = None
    copy_dirs: dict[str, Path] = field(default_factory=dict)  # pipeline subfolder -> source folder


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ToolError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise ToolError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ToolError(f"{path}: expected a JSON object")
    return obj


def component_of_config(config: Mapping[str, Any]) -> str | None:
    cls = config.get("_class_name") or (config.get("architectures") or [None])[0]
    return CLASS_TO_COMPONENT.get(str(cls)) if cls else None


def source_from_folder(root: Path, name: str) -> Source:
    """A diffusers pipeline folder (``model_index.json``) or a component folder/config file."""
    if root.is_file():
        cfg = read_json(root)
        comp = component_of_config(cfg)
        return Source(name, {comp: cfg} if comp else {"?": cfg})
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json")
        configs, copies = {}, {}
        for sub, spec in index.items():
            if sub.startswith("_") or not (root / sub).is_dir():
                continue
            if sub in LIBRARY_CLASS and (root / sub / "config.json").is_file():
                configs[sub] = read_json(root / sub / "config.json")
            elif isinstance(spec, list) and spec[0]:
                copies[sub] = root / sub
        return Source(name, configs, index, copies)
    if (root / "config.json").is_file():
        return source_from_folder(root / "config.json", name)
    raise ToolError(f"{root}: no config.json or model_index.json here")


def _tiny(base: Source, flux: bool, dev: bool) -> Source:
    """Test-size configs with the real structure (the reference configs with small widths)."""
    c = copy.deepcopy(base.configs)
    c["vae"].update(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, sample_size=32,
                    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    c["text_encoder"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=32)
    if flux:
        c["transformer"].update(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
                                guidance_embeds=dev)
        c["text_encoder_2"].update(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2)
    else:
        c["unet"].update(block_out_channels=[32, 64], layers_per_block=2, norm_num_groups=8, sample_size=64,
                         down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                         attention_head_dim=4)
    return Source(f"tiny-{base.name}", c, base.model_index, base.copy_dirs)


def preset(name: str) -> Source:
    ref = reference_dir()
    tiny = name.startswith("tiny-")
    base = name.removeprefix("tiny-")
    if base not in ("sd15", "flux-schnell", "flux-dev"):
        raise ToolError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    if not ref.is_dir():
        raise ToolError(f"{ref}: reference configs not found (set STREAMEXEC_REFERENCE)")
    src = source_from_folder(ref / ("sd15" if base == "sd15" else "flux-schnell"), base)
    if base == "flux-dev":  # what differs for dev: the transformer (guidance embeds)
        src.configs["transformer"] = read_json(ref / "flux-dev" / "transformer" / "config.json")
        if (ref / "flux-dev" / "scheduler").is_dir():
            src.copy_dirs["scheduler"] = ref / "flux-dev" / "scheduler"
    if "tokenizer" not in src.copy_dirs and (ref / "sd15" / "tokenizer").is_dir():
        src.copy_dirs["tokenizer"] = ref / "sd15" / "tokenizer"  # FLUX's CLIP tokenizer is SD 1.5's
    return _tiny(src, base != "sd15", base == "flux-dev") if tiny else src


PRESETS = ("sd15", "flux-schnell", "flux-dev", "tiny-sd15", "tiny-flux-schnell", "tiny-flux-dev")


def apply_overrides(configs: dict[str, dict[str, Any]], sets: list[str], single: str | None) -> None:
    """``[COMPONENT.]KEY=VALUE`` (VALUE as JSON, else a string) into the component configs."""
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ToolError(f"--set {item!r}: expected KEY=VALUE")
        comp, dot, k = key.partition(".")
        if dot and comp in ARCHS:
            comp = ARCHS[comp]
        elif single is not None:
            comp, k = single, key
        else:
            raise ToolError(f"--set {item!r}: name the component, e.g. --set unet.{key}=...")
        if comp not in configs:
            raise ToolError(f"--set {item!r}: no {comp} is being written")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        configs[comp][k] = value


# ------------------------------------------------------------------------------- planning the files


@dataclass(frozen=True)
class Segment:
    """Elements [start, start+count) of a stored tensor are elements [offset, offset+count) of the
    internal tensor ``name`` (of shape ``shape``) of ``component`` (flattened, C order)."""

    start: int
    count: int
    component: str
    name: str
    shape: tuple[int, ...]
    offset: int


@dataclass
class StoredPlan:
    key: str
    dtype: str
    shape: tuple[int, ...]
    segments: list[Segment]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass
class FilePlan:
    relpath: str
    tensors: list[StoredPlan]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def stored_shapes(spec: ComponentSpec, layout: str) -> dict[str, tuple[int, ...]]:
    """The keys and shapes a file of this layout stores for the component (before any prefix)."""
    c = spec.component
    if layout in ("diffusers", "pipeline"):  # save_pretrained drops tied copies (T5 keeps shared)
        return {k: s for k, s in spec.shapes.items() if k not in spec.aliases}
    if layout == "comfy":  # ComfyUI's T5 files store both tied embeddings (see the module doc)
        return dict(spec.shapes)
    if c == "unet":
        return _layout_keys().ldm_unet_shapes(spec.lib_config)
    if c == "vae":
        return _layout_keys().ldm_vae_shapes(spec.lib_config)
    if c == "transformer":
        return _layout_keys().bfl_flux_shapes(spec.lib_config)
    return {k: s for k, s in spec.shapes.items() if k not in spec.aliases}  # ldm CLIP: transformers names


def plan_tensors(
    specs: Mapping[str, ComponentSpec],
    keys: Mapping[str, tuple[str, str, tuple[int, ...]]],
    mapped: Mapping[str, Mapping[str, MappedTensor]],
    where: str,
) -> dict[str, StoredPlan]:
    """Invert the forward mapping: which internal elements fill each stored key.

    ``keys``: stored key -> (component, key without its wrapper prefix, shape); ``mapped``: the
    layouts module's result for these keys. Stored keys the mapping leaves unused are tied copies
    named like an internal tensor (ComfyUI's second T5 embedding)."""
    for comp, spec in specs.items():
        got = {k: mt.shape for k, mt in mapped.get(comp, {}).items()}
        if got != spec.shapes:
            missing, extra = sorted(spec.shapes.keys() - got.keys()), sorted(got.keys() - spec.shapes.keys())
            wrong = sorted(k for k in got.keys() & spec.shapes.keys() if got[k] != spec.shapes[k])
            raise RuntimeError(
                f"{where}: the planned {comp} keys do not map to the library's names "
                f"(missing {missing[:3]}, extra {extra[:3]}, wrong shape {wrong[:3]})"
            )
    segs: dict[str, dict[int, Segment]] = {k: {} for k in keys}
    for comp, tensors in mapped.items():
        for name, mt in tensors.items():
            canon = specs[comp].canonical[name]
            offset = 0
            for ref in mt.parts:
                shape = keys[ref.key][2]
                start = ref.rows[0] * math.prod(shape[1:]) if ref.rows else 0
                seg = Segment(start, math.prod(ref.shape), comp, canon, specs[comp].shapes[canon], offset)
                if segs[ref.key].setdefault(start, seg) != seg:
                    raise RuntimeError(f"{where}: {ref.key} holds both {segs[ref.key][start].name} and {name}")
                offset += seg.count
    plans = {}
    for key, (comp, bare, shape) in keys.items():
        found = [segs[key][s] for s in sorted(segs[key])]
        if not found:
            spec = specs[comp]
            if spec.shapes.get(bare) != shape:
                raise RuntimeError(f"{where}: stored key {key} is not used by the layout mapping")
            canon = spec.canonical[bare]
            found = [Segment(0, math.prod(shape), comp, canon, spec.shapes[canon], 0)]
        pos = 0
        for seg in found:
            if seg.start != pos:
                raise RuntimeError(f"{where}: {key} elements [{pos}, {seg.start}) have no values")
            pos += seg.count
        if pos != math.prod(shape):
            raise RuntimeError(f"{where}: {key} is covered up to element {pos} of {math.prod(shape)}")
        plans[key] = StoredPlan(key, "", shape, found)
    return plans


def _records(keys: Mapping[str, tuple[str, str, tuple[int, ...]]], path: str) -> dict[str, StoredTensor]:
    return {k: StoredTensor(path, k, "F32", shape) for k, (_, _, shape) in keys.items()}


def _set_dtypes(plans: Mapping[str, StoredPlan], tag: str, small_tag: str) -> None:
    for p in plans.values():
        p.dtype = small_tag if len(p.shape) <= 1 else tag


def _save_order(tensors: list[StoredPlan]) -> list[StoredPlan]:
    return sorted(tensors, key=lambda t: (_SAVE_ORDER[t.dtype], t.key))


def parse_size(text: str) -> int:
    """``5GB``/``5G`` (decimal, as save_pretrained), ``5GiB`` (binary) or plain bytes."""
    s = text.strip().upper().removesuffix("B")
    units = {"KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    mult = 1
    for u, m in units.items():
        if s.endswith(u):
            s, mult = s[: -len(u)], m
            break
    try:
        n = int(float(s) * mult)
    except ValueError:
        raise ToolError(f"--shard-size {text!r}: expected a size like 5GB, 500MB, 2GiB") from None
    if n <= 0:
        raise ToolError(f"--shard-size {text!r}: must be positive")
    return n


def _variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    base, ext = name.rsplit(".safetensors", 1)
    return f"{base}.{variant}.safetensors{ext}"


def plan_component_folder(
    spec: ComponentSpec, sub: str, tag: str, small_tag: str, shard_size: int | None, variant: str | None
) -> tuple[list[FilePlan], dict[str, str]]:
    """A diffusers component folder: its weight files and the small text files (name -> text)."""
    c = spec.component
    weights = "model.safetensors" if c.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    shapes = stored_shapes(spec, "diffusers")
    keys = {k: (c, k, s) for k, s in shapes.items()}
    mapped = {c: map_component(c, _records(keys, f"{sub}/{weights}"), sub or ".")}
    plans = plan_tensors({c: spec}, keys, mapped, sub or c)
    _set_dtypes(plans, tag, small_tag)
    texts = {"config.json": json.dumps(spec.config, indent=2, sort_keys=True) + "\n"}
    ordered = [plans[k] for k in shapes]  # module order, as save_pretrained shards
    shards: list[list[StoredPlan]] = [[]]
    size = 0
    for p in ordered:
        if shard_size is not None and shards[-1] and size + p.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    if len(shards) == 1:
        return [FilePlan(f"{sub}/{_variant(weights, variant)}".lstrip("/"), _save_order(shards[0]))], texts
    n = len(shards)
    stem = _variant(weights, variant).removesuffix(".safetensors")
    files = [FilePlan(f"{sub}/{stem}-{i + 1:05d}-of-{n:05d}.safetensors".lstrip("/"), _save_order(s))
             for i, s in enumerate(shards)]
    index = {
        "metadata": {"total_size": sum(f.nbytes for f in files)},
        "weight_map": {t.key: Path(f.relpath).name for f in files for t in f.tensors},
    }
    index_name = f"{weights}.index.{variant}.json" if variant else f"{weights}.index.json"
    texts[index_name] = json.dumps(index, indent=2, sort_keys=True) + "\n"
    return files, texts


def single_file_name(layout: str, specs: Mapping[str, ComponentSpec], dtype: str) -> str:
    comps = set(specs)
    if layout == "bfl" and comps == {"transformer"}:
        return f"flux1-{'dev' if specs['transformer'].lib_config.get('guidance_embeds') else 'schnell'}.safetensors"
    if layout == "bfl":
        return "ae.safetensors"
    if layout == "comfy" and comps == {"text_encoder"}:
        return "clip_l.safetensors"
    if layout == "comfy":
        return f"t5xxl_{ {'fp8_e4m3': 'fp8_e4m3fn'}.get(dtype, dtype)}.safetensors"
    return "v1-5-random.safetensors" if len(comps) > 1 else f"sd15-{next(iter(comps))}.safetensors"


def plan_single_file(
    layout: str, specs: Mapping[str, ComponentSpec], relpath: str, tag: str, small_tag: str
) -> FilePlan:
    keys: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for c, spec in specs.items():
        prefix = LDM_PREFIX[c] if layout == "ldm" else ""
        for k, s in stored_shapes(spec, layout).items():
            keys[prefix + k] = (c, k, s)
    try:
        result = detect_layout(_records(keys, relpath), relpath)
    except StreamexecError as e:
        raise RuntimeError(f"the planned {layout} file is not recognised by streamexec: {e}") from None
    if set(result.components) != set(specs):
        raise RuntimeError(f"{relpath}: planned {sorted(specs)} but the layout reads {sorted(result.components)}")
    plans = plan_tensors(specs, keys, result.components, relpath)
    _set_dtypes(plans, tag, small_tag)
    return FilePlan(relpath, _save_order(list(plans.values())))


# ---------------------------------------------------------------------------------------- writing


#: Chunks in flight on the worker threads (each ~4 MiB of f32 plus its encoded copy).
LOOKAHEAD = 3


def pending(
    plan: StoredPlan, seed: int, progress: Callable[[int], None], pool: ThreadPoolExecutor | None
) -> PendingTensor:
    """The tensor as the writer wants it: its bytes made chunk by chunk (with ``pool``, a few
    chunks ahead on worker threads; numpy's generator and torch's casts release the GIL)."""

    def make(seg: Segment, lo: int, hi: int) -> np.ndarray:
        return encode(piece_values(seed, seg.component, seg.name, seg.shape, lo, hi), plan.dtype)

    def produce(write: Callable[[np.ndarray], None]) -> None:
        pieces = (
            (seg, lo, hi)
            for seg in plan.segments
            for lo, hi in _pieces(math.prod(seg.shape), seg.offset, seg.offset + seg.count)
        )

        def emit(b: np.ndarray) -> None:
            write(b)
            progress(b.nbytes)

        if pool is None:
            for piece in pieces:
                emit(make(*piece))
            return
        ahead: deque[Future[np.ndarray]] = deque()
        for piece in pieces:
            ahead.append(pool.submit(make, *piece))
            if len(ahead) > LOOKAHEAD:
                emit(ahead.popleft().result())
        while ahead:
            emit(ahead.popleft().result())

    return PendingTensor(plan.key, plan.dtype, plan.shape, produce)


class Progress:
    """Byte counter that prints a line to stderr every few seconds."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.t0 = self.last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.quiet and now - self.last >= 10:
            self.last = now
            rate = self.done / (now - self.t0) / 1e6
            print(f"  {self.done / 1e9:.2f} / {self.total / 1e9:.2f} GB  ({rate:.0f} MB/s)", file=sys.stderr)


@dataclass
class Job:
    """Everything one invocation writes."""

    out: Path
    single_file: bool
    files: list[FilePlan]
    texts: dict[str, str]  # relpath -> content
    copies: dict[str, Path]  # relpath of a folder -> source folder

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def plan_job(args: argparse.Namespace) -> tuple[Job, dict[str, ComponentSpec]]:
    layout = args.layout
    if args.arch not in ARCHS and args.arch != "all":
        raise ToolError(f"unknown ARCH {args.arch!r} (known: {', '.join(ARCHS)}, all)")
    if layout not in LAYOUTS:
        raise ToolError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if (args.preset is None) == (args.config is None):
        raise ToolError("give exactly one of --preset NAME and --config PATH")
    src = preset(args.preset) if args.preset else source_from_folder(Path(args.config), Path(args.config).name)
    wanted = ARCHS.get(args.arch)
    if "?" in src.configs:  # a config file without _class_name/architectures: trust ARCH
        if wanted is None:
            raise ToolError(f"{args.config}: cannot tell which model this config is; name the ARCH")
        src.configs = {wanted: src.configs["?"]}
    if wanted is None:
        comps = [c for c in LIBRARY_CLASS if c in src.configs]
        if layout == "ldm":
            comps = [c for c in comps if c in LAYOUTS["ldm"]]
            if set(comps) != set(LAYOUTS["ldm"]) or "transformer" in src.configs:
                raise ToolError("ldm with ARCH all writes an SD 1.5 file (unet, vae, clip): use an SD preset/config")
        elif layout != "pipeline":
            raise ToolError(f"ARCH all goes with --layout pipeline or ldm, not {layout}")
    else:
        if wanted not in src.configs:
            have = ", ".join(src.configs) or "none"
            raise ToolError(f"{src.name} has no {wanted} config (it has: {have})")
        comps = [wanted]
        if wanted not in LAYOUTS[layout]:
            raise ToolError(f"layout {layout} holds {', '.join(LAYOUTS[layout])}, not {wanted}")
    configs = {c: copy.deepcopy(src.configs[c]) for c in comps}
    apply_overrides(configs, args.set or [], wanted)
    for c, cfg in configs.items():
        found = component_of_config(cfg)
        if found is not None and found != c:
            raise ToolError(f"the {c} config is for {cfg.get('_class_name') or cfg.get('architectures')}")
    specs = {c: component_spec(c, cfg) for c, cfg in configs.items()}

    if args.shard_size:
        parse_size(args.shard_size)
    if (args.shard_size or args.variant) and layout not in ("diffusers", "pipeline"):
        raise ToolError(f"--shard-size/--variant go with the diffusers/pipeline layouts, not {layout}")
    try:
        return _plan_files(args, src, specs)
    except (RuntimeError, StreamexecError) as e:  # a config the layout (or its key generator) cannot hold
        raise ToolError(f"cannot write this config in the {layout} layout: {e}") from None


def _plan_files(
    args: argparse.Namespace, src: Source, specs: dict[str, ComponentSpec]
) -> tuple[Job, dict[str, ComponentSpec]]:
    layout = args.layout
    tag = DTYPE_TAGS[args.dtype]
    small = DTYPE_TAGS[args.small_dtype] if args.small_dtype else tag
    shard = parse_size(args.shard_size) if args.shard_size else None
    out = Path(args.out)
    files: list[FilePlan] = []
    texts: dict[str, str] = {}
    copies: dict[str, Path] = {}
    if layout in ("diffusers", "pipeline"):
        for c, spec in specs.items():
            sub = c if layout == "pipeline" else ""
            f, t = plan_component_folder(spec, sub, tag, small, shard, args.variant)
            files += f
            texts |= {f"{sub}/{k}".lstrip("/"): v for k, v in t.items()}
        if layout == "pipeline":
            copies = {sub: p for sub, p in src.copy_dirs.items() if p.is_dir()}
            texts["model_index.json"] = json.dumps(model_index(src, specs, copies), indent=2) + "\n"
        return Job(out, False, files, texts, copies), specs
    name = out.name if out.suffix == ".safetensors" else single_file_name(layout, specs, args.dtype)
    file = plan_single_file(layout, specs, name, tag, small)
    return Job(out if out.suffix == ".safetensors" else out / name, True, [file], {}, {}), specs


def model_index(src: Source, specs: Mapping[str, ComponentSpec], copies: Mapping[str, Path]) -> dict[str, Any]:
    """The source's model_index.json restricted to what this pipeline folder holds."""
    base = dict(src.model_index or {})
    if "_class_name" not in base:
        base["_class_name"] = "FluxPipeline" if "transformer" in specs else "StableDiffusionPipeline"
    out = {k: v for k, v in base.items() if k.startswith("_")}
    for c in specs:
        out[c] = list(LIBRARY_CLASS[c])
    for sub in copies:
        if sub in base:
            out[sub] = base[sub]
        elif sub == "tokenizer":
            out[sub] = ["transformers", "CLIPTokenizer"]
    return dict(sorted(out.items(), key=lambda kv: (not kv[0].startswith("_"), kv[0])))


def _check_space(job: Job) -> None:
    parent = job.out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    need = job.nbytes + (64 << 20)
    if need > free:
        raise ToolError(f"{parent}: needs {need / 1e9:.2f} GB of disk, {free / 1e9:.2f} GB free")


def execute(job: Job, seed: int, force: bool, quiet: bool, threads: int = 1) -> None:
    """Write the job: one file atomically, or a whole folder built aside and renamed into place."""
    if job.out.exists() and not force:
        raise ToolError(f"{job.out}: already exists (use --force to replace it)")
    _check_space(job)
    progress = Progress(job.nbytes, quiet)
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        if job.single_file:
            job.out.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(job.out, [pending(t, seed, progress, pool) for t in job.files[0].tensors], METADATA)
        else:
            _write_folder(job, seed, progress, pool, quiet)


METADATA = {"format": "pt"}


def _write_folder(job: Job, seed: int, progress: Progress, pool: ThreadPoolExecutor | None, quiet: bool) -> None:
    tmp = job.out.with_name(f".{job.out.name}.partial-{os.getpid()}")
    old = job.out.with_name(f".{job.out.name}.old-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        for rel, text in job.texts.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
        for rel, src in job.copies.items():
            shutil.copytree(src, tmp / rel)
        for f in job.files:
            path = tmp / f.relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            if not quiet:
                print(f"writing {f.relpath} ({len(f.tensors)} tensors, {f.nbytes / 1e9:.3f} GB)", file=sys.stderr)
            write_safetensors(path, [pending(t, seed, progress, pool) for t in f.tensors], METADATA)
        if job.out.exists():
            os.rename(job.out, old)
        os.rename(tmp, job.out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(job: Job, specs: Mapping[str, ComponentSpec]) -> str:
    lines = [f"{job.out}:"]
    for c, spec in specs.items():
        lines.append(f"  {c}: {LIBRARY_CLASS[c][1]}, {spec.params:,} parameters, {len(spec.shapes)} tensors")
    for f in job.files:
        dts = sorted({t.dtype for t in f.tensors})
        lines.append(f"  {f.relpath}: {len(f.tensors)} tensors, {f.nbytes:,} bytes ({'/'.join(dts)})")
    for rel in list(job.texts) + [f"{r}/" for r in job.copies]:
        lines.append(f"  {rel}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Job:
    job, specs = plan_job(args)
    if args.dry_run:
        print(describe(job, specs))
        return job
    t0 = time.monotonic()
    execute(job, args.seed, args.force, args.quiet, args.threads)
    if not args.quiet:
        dt = time.monotonic() - t0
        print(f"wrote {job.out} ({job.nbytes / 1e9:.3f} GB in {dt:.1f} s, {job.nbytes / 1e6 / max(dt, 1e-9):.0f} MB/s)",
              file=sys.stderr)
    return job


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_checkpoint.py",
        description="Write a seeded random-weight checkpoint (streaming; RAM stays ~ one chunk).",
        epilog=__doc__[__doc__.index("Layouts (") : __doc__.index("Values.")].replace("Examples::", "Examples:"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("arch", metavar="ARCH", help="unet, vae, clip, flux, t5 (or a component name), or all")
    p.add_argument("out", metavar="OUT", help="folder to create, or a .safetensors file for single-file layouts")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=PRESETS, help="named configs (reference ones or tiny test ones)")
    src.add_argument("--config", help="config.json, component folder or pipeline folder")
    p.add_argument("--layout", default="diffusers", choices=list(LAYOUTS))
    p.add_argument("--dtype", default="bf16", choices=list(DTYPE_TAGS))
    p.add_argument("--small-dtype", choices=list(DTYPE_TAGS), help="dtype of 1-D tensors (default: --dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", help="shard diffusers weight files (e.g. 5GB, 500MB, 2GiB) with an index json")
    p.add_argument("--variant", help="diffusers variant name in the file names (e.g. fp16)")
    p.add_argument("--set", action="append", metavar="[COMP.]KEY=VALUE", help="override a config value (JSON)")
    p.add_argument("--threads", type=int, default=1, help="generator threads (2 is ~1.3x faster, ~50 MB more RSS)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except ToolError as e:
        print(f"make_checkpoint: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"make_checkpoint: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_checkpoint: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
