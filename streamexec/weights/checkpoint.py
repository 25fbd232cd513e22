"""Opening a checkpoint: a single file, a diffusers component folder (maybe sharded), or a
diffusers pipeline folder. Finds the files, validates every header, maps keys to the internal
naming (via ``layouts``) and hands out one WeightStore per component."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from .layouts import COMPONENTS, detect_layout, map_component
from .refs import MappedTensor, StoredTensor
from .safetensors_file import SafetensorsFile
from .store import WeightStore

#: Pickle-based formats we refuse: loading them runs arbitrary code.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")

#: diffusers/transformers class name -> the component name streamexec uses.
CLASS_TO_COMPONENT = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "FluxTransformer2DModel": "transformer",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",  # SDXL's OpenCLIP bigG
    "T5EncoderModel": "text_encoder_2",
    "AutoencoderTiny": "taesd",
}

_MAX_JSON_BYTES = 16 * 1024 * 1024


def pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        path,
        "pickle checkpoints (.ckpt/.bin/.pt) are refused: loading one can run arbitrary code. "
        "Convert it to safetensors once on a machine you trust (e.g. with the safetensors "
        "package's convert script) and point streamexec at the .safetensors file",
    )


def read_json(path: Path) -> dict:
    """Read a small JSON config file; one clear error for anything wrong with it."""
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise CheckpointError(path, "JSON file is implausibly large")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, "expected a JSON object")
    return obj


@dataclass
class Component:
    """One model component: its config (if the checkpoint has one) and its mapped tensors."""

    name: str
    layout: str
    tensors: dict[str, MappedTensor]
    config: dict | None = None
    folder: Path | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def bytes_by_dtype(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for t in self.tensors.values():
            c[t.dtype] += t.nbytes
        return dict(c)


@dataclass
class Checkpoint:
    """Everything streamexec needs to know about the user's weights (no weight data read)."""

    root: Path
    kind: str  # "file", "component" or "pipeline"
    files: dict[str, SafetensorsFile]
    components: dict[str, Component]
    model_index: dict | None = None
    ignored: list[str] = field(default_factory=list)
    #: role -> file given for it (``weights.roles``: --diffusion-model, --vae, --clip-l, --t5xxl)
    roles: dict[str, str] = field(default_factory=dict)

    def component(self, name: str | None = None) -> Component:
        if name is None:
            if len(self.components) == 1:
                return next(iter(self.components.values()))
            raise CheckpointError(
                self.root,
                f"holds several components ({', '.join(self.components)}); choose one with --component",
            )
        try:
            return self.components[name]
        except KeyError:
            raise CheckpointError(
                self.root,
                f"has no component {name!r} (it has: {', '.join(self.components) or 'none'})",
            ) from None

    def store(self, name: str | None = None) -> WeightStore:
        comp = self.component(name)
        paths = {p.path for t in comp.tensors.values() for p in t.parts}
        return WeightStore(comp.tensors, {p: self.files[p] for p in paths})

    def fingerprint(self) -> list[dict[str, object]]:
        """Per file: path, size and a hash of the header (what ``run`` checks against a plan)."""
        return [
            {
                "path": str(f.path),
                "size": f.size,
                "header_sha256": hashlib.sha256(f.header_bytes).hexdigest(),
            }
            for f in self.files.values()
        ]

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


# -- discovery ----------------------------------------------------------------------------------
def open_checkpoint(path: str | Path, variant: str | None = None) -> Checkpoint:
    """Open a ``.safetensors`` file, a component folder or a pipeline folder (headers only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_file():
        return _open_single_file(path)
    if (path / "model_index.json").is_file():
        return _open_pipeline(path, variant)
    if (path / "config.json").is_file():
        comp = _open_component_folder(path, variant, files := {})
        return Checkpoint(path, "component", files, {comp.name: comp})
    if any(path.glob("*.safetensors")):
        raise CheckpointError(
            path,
            "folder has .safetensors files but no model_index.json or config.json: "
            "give one of the files itself, or a diffusers folder",
        )
    raise CheckpointError(path, "not a model: no .safetensors file, model_index.json or config.json")


def _open_file(path: Path, files: dict[str, SafetensorsFile]) -> SafetensorsFile:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    key = str(path)
    if key not in files:
        files[key] = SafetensorsFile(path)
    return files[key]


def _stored(f: SafetensorsFile) -> dict[str, StoredTensor]:
    return {
        k: StoredTensor(str(f.path), k, t.dtype.tag, t.shape) for k, t in f.tensors.items()
    }


def _open_single_file(path: Path) -> Checkpoint:
    files: dict[str, SafetensorsFile] = {}
    f = _open_file(path, files)
    if not f.tensors:
        raise CheckpointError(path, "holds no tensors")
    result = detect_layout(_stored(f), str(path))
    from ..configs import default_config

    sdxl = result.layout == "sgm-sdxl"
    comps = {name: Component(name, result.layout, t, default_config(name, t, sdxl=sdxl))
             for name, t in result.components.items()}
    return Checkpoint(path, "file", files, comps, ignored=list(result.ignored))


_VARIANT_RE = re.compile(r"^(?P<base>.+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?\.safetensors$")
_INDEX_RE = re.compile(r"^[^.]+(?:\.(\w+))?\.safetensors\.index(?:\.(\w+))?\.json$")


def _weight_files(
    folder: Path, variant: str | None, fallback: bool = False
) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of one component folder, honouring sharding and variants.

    With ``fallback`` (components of a pipeline), a component that lacks the requested variant
    uses its default weights, as diffusers does."""
    indexes = sorted(folder.glob("*.safetensors.index.json")) + sorted(
        folder.glob("*.safetensors.index.*.json")
    )

    def variant_of(name: str) -> str | None:
        m = _INDEX_RE.match(name)
        return (m.group(1) or m.group(2)) if m else None

    chosen = [p for p in indexes if variant_of(p.name) == variant]
    if not chosen and fallback and variant is not None:
        chosen = [p for p in indexes if variant_of(p.name) is None]
    if chosen:
        index = read_json(chosen[0])
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
        ):
            raise CheckpointError(chosen[0], "index has no valid weight_map")
        shards = []
        for name in sorted(set(wm.values())):
            p = (folder / name).resolve()
            if p.parent != folder.resolve():
                raise CheckpointError(chosen[0], f"shard {name!r} is outside the folder")
            if not p.is_file():
                raise CheckpointError(chosen[0], f"shard {name!r} is missing")
            shards.append(p)
        return shards, wm

    candidates = sorted(folder.glob("*.safetensors"))
    by_variant: dict[str | None, list[Path]] = {}
    for p in candidates:
        m = _VARIANT_RE.match(p.name)
        v = m.group("variant") if m else None
        by_variant.setdefault(v, []).append(p)
    if variant in by_variant:
        return by_variant[variant], None
    if fallback and None in by_variant:
        return by_variant[None], None
    if variant is None and len(by_variant) == 1:
        return next(iter(by_variant.values())), None
    if by_variant:
        have = ", ".join(sorted(v or "(none)" for v in by_variant))
        raise CheckpointError(
            folder, f"no weights for variant {variant or '(none)'}; variants present: {have} (use --variant)"
        )
    pickles = sorted(p for s in PICKLE_SUFFIXES for p in folder.glob(f"*{s}"))
    if pickles:
        raise pickle_refusal(pickles[0])
    raise CheckpointError(folder, "no .safetensors weights in this folder (for configs without weights, "
                          "'streamexec inspect FOLDER' shows the plan's matrices and sizes)")


def _open_component_folder(
    folder: Path, variant: str | None, files: dict[str, SafetensorsFile], name: str | None = None,
    fallback: bool = False,
) -> Component:
    config = read_json(folder / "config.json")
    cls = config.get("_class_name") or (config.get("architectures") or [None])[0]
    comp_name = name or CLASS_TO_COMPONENT.get(str(cls)) or folder.name
    tensors: dict[str, StoredTensor] = {}
    paths, weight_map = _weight_files(folder, variant, fallback)
    for p in paths:
        f = _open_file(p, files)
        for k, st in _stored(f).items():
            if k in tensors:
                raise CheckpointError(p, f"tensor {k!r} also appears in {Path(tensors[k].path).name}")
            tensors[k] = st
    if weight_map is not None:
        for k, shard in weight_map.items():
            if k not in tensors or Path(tensors[k].path).name != shard:
                raise CheckpointError(folder / shard, f"index names tensor {k!r} but the shard lacks it")
    if not tensors:
        raise CheckpointError(folder, "weights hold no tensors")
    mapped = map_component(comp_name, tensors, str(folder))
    return Component(comp_name, "diffusers", mapped, config, folder)


def _open_pipeline(root: Path, variant: str | None) -> Checkpoint:
    index = read_json(root / "model_index.json")
    files: dict[str, SafetensorsFile] = {}
    comps: dict[str, Component] = {}
    for name, spec in index.items():
        if name.startswith("_") or name not in COMPONENTS:  # tokenizers, schedulers: config only
            continue
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0]):
            continue
        folder = root / name
        if not folder.is_dir():
            raise CheckpointError(root, f"model_index.json lists {name!r} but the folder is missing")
        comps[name] = _open_component_folder(folder, variant, files, name=name, fallback=True)
    if not comps:
        raise CheckpointError(root, "model_index.json names no component with weights")
    return Checkpoint(root, "pipeline", files, comps, model_index=index)
