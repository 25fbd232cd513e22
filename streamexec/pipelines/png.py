"""PNG output: written atomically (a temp file in the same folder, renamed into place, so a crash
or Ctrl-C never leaves a half-written image), with the generation parameters in text chunks —
``parameters`` in the form other SD tools write and read, and ``streamexec`` as JSON."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import StreamexecError


def _umask_mode() -> int:
    """The mode a normally created file gets (0666 minus the umask): mkstemp's 0600 would make
    the image unreadable to other users."""
    um = os.umask(0)
    os.umask(um)
    return 0o666 & ~um


def parameters_text(p: dict) -> str:
    """The A1111-style ``parameters`` text: prompt, negative prompt, then "Key: value" pairs."""
    lines = [str(p.get("prompt", ""))]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    keys = [("steps", "Steps"), ("sampler", "Sampler"), ("timestep_spacing", "Timestep spacing"), ("eta", "Eta"),
            ("cfg_scale", "CFG scale"), ("guidance", "Guidance"), ("seed", "Seed"), ("size", "Size"),
            ("model", "Model"), ("lora_hashes", "Lora hashes"), ("strength", "Denoising strength")]
    if p.get("size") is None and p.get("width") and p.get("height"):
        p = {**p, "size": f"{p['width']}x{p['height']}"}  # width x height, as AUTOMATIC1111 writes it
    pairs = [f"{label}: {p[k]}" for k, label in keys if p.get(k) is not None]
    pairs.append("Generator: streamexec")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def save_png(path: str | Path, image: np.ndarray, parameters: dict) -> Path:
    """Write ``image`` (uint8 [H, W, 3]) to ``path`` atomically, with the parameters embedded."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise StreamexecError(f"internal: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    info = PngInfo()
    info.add_text("parameters", parameters_text(parameters))
    info.add_text("streamexec", json.dumps(parameters, sort_keys=True, default=str))
    return _atomic(path, lambda fh: Image.fromarray(image, "RGB").save(fh, format="PNG", pnginfo=info),
                   make_folder=True, durable=True)


def _atomic(path: str | Path, write, *, make_folder: bool = False, durable: bool = False) -> Path:
    """Run ``write(fh)`` on a temporary file next to ``path``, then rename it over ``path``: readers
    see the old file or the whole new one, never a part; on any error the temporary goes.
    ``make_folder`` creates missing parent folders; ``durable`` fsyncs before the rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        if make_folder:
            folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise StreamexecError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StreamexecError(f"cannot write {path}: {e.strerror}") from None
        raise
    return path


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` atomically (the latents checkpoints ``--latents-out`` writes every step)."""
    return _atomic(path, lambda fh: np.save(fh, array))


def save_npz(path: str | Path, arrays: dict) -> Path:
    """``np.savez`` atomically (sampler history for ``--resume``)."""
    return _atomic(path, lambda fh: np.savez(fh, **arrays))


def save_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda fh: fh.write(text.encode()))
