"""LoRA files: detect the key format, read the factors, and match them to a component's weights.

Formats (detected by keys):
- kohya / AUTOMATIC1111: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (``lora_te_…`` for the text encoder); the module name is the diffusers/transformers
  one with dots turned into underscores, resolved against the component's own keys.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (also ``.lora.down/up``,
  ``text_encoder.…``); scale alpha/rank with ``.alpha`` when present, else 1 (diffusers' default).
Conv LoRAs (LoCon: kxk down, 1x1 up) apply to conv weights. LyCORIS LoHa/LoKr are refused with a
message naming what is supported.

The factors are small: they are decoded to f32 and kept in RAM; the merge happens panel by panel
in the kernels (``kernels.lora.LoraWeight``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import StreamexecError
from .safetensors_file import SafetensorsFile

__all__ = ["LoraError", "LoraFile", "read_loras", "read_lora", "parse_lora_arg", "prompt_loras", "lora_hashes",
           "lora_factors",
           "SUPPORTED"]

SUPPORTED = "kohya/AUTOMATIC1111 (lora_unet_…/lora_te_… .lora_down/.lora_up/.alpha) and diffusers/PEFT " \
            "(unet.…/text_encoder.… .lora_A/.lora_B), linear and conv (LoCon)"

# component -> key prefixes in each format
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_PEFT_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder."}
_LYCORIS = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2)$")
_KOHYA = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|alpha)$")
_PART = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
         "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up", "alpha": "alpha"}


class LoraError(StreamexecError):
    """A LoRA file or argument that cannot be applied."""


@dataclass
class LoraFile:
    """One LoRA file: ``modules[component][name] = {"up", "down", "alpha"?}`` (f32 arrays); ``name``
    is dotted (PEFT) or underscored (kohya, ``kohya`` True) and has no component prefix."""

    path: str
    kohya: bool
    modules: dict[str, dict[str, dict[str, np.ndarray]]]


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (file, weight); the weight defaults to 1."""
    path, sep, w = arg.rpartition(":")
    if not sep or not path or "/" in w or "\\" in w:
        return arg, 1.0
    try:
        weight = float(w)
    except ValueError:
        raise LoraError(f"--lora {arg}: weight {w!r} is not a number (use FILE[:WEIGHT], e.g. style.safetensors:0.8)") \
            from None
    if not np.isfinite(weight):
        raise LoraError(f"--lora {arg}: weight must be finite")
    return path, weight


_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def prompt_loras(prompt: str, lora_dir: str | Path | None) -> tuple[str, list[tuple[str, float]]]:
    """AUTOMATIC1111 / stable-diffusion.cpp prompt syntax: every ``<lora:NAME[:WEIGHT]>`` is removed
    from ``prompt`` and resolved to ``lora_dir/NAME.safetensors``. Returns (prompt, [(path, weight)])."""
    tags = list(_TAG.finditer(prompt))
    if not tags:
        return prompt, []
    if lora_dir is None:
        raise LoraError(f"the prompt names {tags[0].group(0)}: give the folder of LoRA files with --lora-dir")
    d = Path(lora_dir)
    if not d.is_dir():
        raise LoraError(f"--lora-dir {d}: not a folder")
    found = []
    for t in tags:
        name, w = t.group(1).strip(), t.group(2)
        try:
            weight = 1.0 if w is None or not w.strip() else float(w)
        except ValueError:
            raise LoraError(f"{t.group(0)}: weight {w!r} is not a number") from None
        path = d / (name if name.endswith(".safetensors") else name + ".safetensors")
        if not path.is_file():
            import difflib

            names = sorted(p.stem for p in d.glob("*.safetensors"))
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            raise LoraError(f"{t.group(0)}: no {path.name} in {d}" + (f" (close: {', '.join(close)})" if close else
                            f" (it has: {', '.join(names[:5]) or 'no .safetensors'})"))
        found.append((str(path), weight))
    clean = re.sub(r"\s{2,}", " ", _TAG.sub("", prompt)).strip().strip(",").strip()
    return clean, found


def lora_hashes(loras: list[tuple[str | Path, float]]) -> str:
    """The PNG ``Lora hashes`` value as AUTOMATIC1111 writes it: ``"name: hash, ..."`` with the first
    12 hex digits of each file's SHA-256 and the weight after an ``@`` when it is not 1."""
    import hashlib

    parts = []
    for p, w in loras:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        parts.append(f"{Path(p).stem}: {h.hexdigest()[:12]}" + ("" if w == 1 else f"@{w:g}"))
    return '"' + ", ".join(parts) + '"'


def read_lora(path: str | Path) -> LoraFile:
    """Read and classify a LoRA safetensors file (raises LoraError for unsupported formats)."""
    from ..kernels.decode import decode_to_f32

    f = SafetensorsFile(path)
    keys = f.keys()
    lyco = [k for k in keys if _LYCORIS.search(k)]
    if lyco:
        raise LoraError(f"{path}: LyCORIS LoHa/LoKr LoRA (e.g. {lyco[0]}) is not supported; supported: {SUPPORTED}")
    kohya = any(k.startswith(tuple(_KOHYA_PREFIX.values())) for k in keys)
    pattern, prefixes = (_KOHYA, _KOHYA_PREFIX) if kohya else (_PEFT, _PEFT_PREFIX)
    modules: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key in keys:
        m = pattern.match(key)
        comp = next((c for c, p in prefixes.items() if key.startswith(p)), None)
        if m is None or comp is None:
            continue
        name = m["mod"][len(prefixes[comp]):]
        info = f.info(key)
        dtype = info.dtype if isinstance(info.dtype, str) else info.dtype.tag
        arr = np.array(decode_to_f32(f.view(key), dtype), dtype=np.float32)
        modules.setdefault(comp, {}).setdefault(name, {})[_PART[m["part"]]] = arr
    if not modules:
        raise LoraError(f"{path}: not a LoRA this version reads ({len(keys)} tensors, e.g. "
                        f"{keys[0] if keys else 'none'}); supported: {SUPPORTED}")
    for comp, mods in modules.items():
        for name, parts in mods.items():
            if "up" not in parts or "down" not in parts:
                raise LoraError(f"{path}: {comp} module {name} has no {'up' if 'up' not in parts else 'down'} factor")
            up, down = parts["up"], parts["down"]
            if up.ndim == 4 and down.ndim == 4 and up.shape[2:] == (1, 1):  # conv (LoCon): kxk down, 1x1 up
                parts["up"] = up.reshape(up.shape[0], -1)
                parts["kernel"] = down.shape[2:]
                parts["down"] = down.reshape(down.shape[0], -1)
            elif up.ndim != 2 or down.ndim != 2:
                raise LoraError(f"{path}: {comp} module {name}: factors {down.shape} / {up.shape} are neither a "
                                f"linear nor a conv (LoCon) LoRA; supported: {SUPPORTED}")
            if parts["up"].shape[1] != parts["down"].shape[0]:
                raise LoraError(f"{path}: {comp} module {name}: rank of up {parts['up'].shape} and down "
                                f"{parts['down'].shape} differ")
            a = parts.get("alpha")
            if a is not None and (a.size != 1 or not np.isfinite(a).all()):
                raise LoraError(f"{path}: {comp} module {name}: alpha must be one finite number, got shape {a.shape}")
    return LoraFile(str(path), kohya, modules)


def read_loras(loras: list[tuple[str | Path, float]], components: list[str] | tuple[str, ...],
               what: str = "model") -> list[tuple[LoraFile, float]]:
    """Read ``[(path, weight), ...]`` once each, refusing a file with nothing for ``components``."""
    files = [(read_lora(p), float(w)) for p, w in loras]
    for lf, _ in files:
        if not any(c in components for c in lf.modules):
            raise LoraError(f"{lf.path}: a LoRA for {', '.join(lf.modules)}, which this {what} does not have "
                            f"({', '.join(components)})")
    return files


def lora_factors(loras: list[tuple[LoraFile, float]], component: str,
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[np.ndarray, np.ndarray, float]]]:
    """For the weights of ``component`` (``shapes``: internal key -> shape), the factors each LoRA
    adds: ``{key: [(up [N, r], down [r, K], weight * alpha / r), ...]}``.

    Raises LoraError when a LoRA's modules for this component match none of its weights (how
    many matched, an example key) or a factor's shape does not fit (the first mismatch)."""
    out: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    # module name -> weight key; CLIP's modules also without transformers' "text_model." (as
    # get_peft_model_state_dict names them on a CLIPTextModel)
    by_name = {}
    for k in shapes:
        if k.endswith(".weight"):
            by_name[k[: -len(".weight")]] = k
            if k.startswith("text_model."):
                by_name.setdefault(k[len("text_model.") : -len(".weight")], k)
    by_kohya = {n.replace(".", "_"): k for n, k in by_name.items()}
    for lf, weight in loras:
        mods = lf.modules.get(component, {})
        if not mods:
            continue
        matched = 0
        unknown = []
        for name, parts in mods.items():
            key = (by_kohya if lf.kohya else by_name).get(name)
            if key is None:
                unknown.append(name)
                continue
            up, down = parts["up"], parts["down"]
            shape = shapes[key]
            kernel = tuple(parts.get("kernel", (1, 1)))
            gives = (up.shape[0], down.shape[1] // (kernel[0] * kernel[1]), *kernel)
            want = tuple(shape) if len(shape) == 4 else (*shape, 1, 1)
            if len(shape) not in (2, 4) or gives != want:
                raise LoraError(f"{lf.path}: {component} module {name}: LoRA gives {gives[:len(shape)]}, "
                                f"the model's {key} is {tuple(shape)} (a LoRA for another model?)")
            rank = down.shape[0]
            alpha = float(parts["alpha"].reshape(-1)[0]) if "alpha" in parts else float(rank)
            out.setdefault(key, []).append((up, down, weight * alpha / rank))
            matched += 1
        if matched == 0:
            raise LoraError(f"{lf.path}: none of its {len(mods)} {component} modules match the model "
                            f"(0 matched; e.g. {unknown[0]}, model keys like {next(iter(shapes), 'none')})")
        if unknown:
            import warnings

            warnings.warn(f"{lf.path}: {len(unknown)} of {len(mods)} {component} modules match nothing in the model "
                          f"(e.g. {unknown[0]}); they are ignored", stacklevel=2)
    return out
