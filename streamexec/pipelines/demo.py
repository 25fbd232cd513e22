"""The embedded demo model: a small SD 1.5-architecture pipeline (UNet, CLIP text encoder, VAE)
with seeded random weights, built once on first use under the user's cache folder — so that
``streamexec run plans/demo.yaml --prompt …`` works on a fresh machine with no download.

Its weights are random: the picture is noise. It exists to show the whole path (tokenize → CLIP →
UNet loop → VAE → PNG) running inside a memory budget, in well under a minute on 2 cores. The
shapes come from ``streamexec/configs/demo`` (diffusers state-dict names); the tokenizer is SD
1.5's real CLIP BPE (shipped in ``streamexec/configs/sd15/tokenizer``), so prompts tokenize
exactly as for SD 1.5. Weights are stored in fp16, as most published checkpoints are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..configs import REFERENCE_DIR
from ..errors import StreamexecError

DEMO_VERSION = 1
DEMO_SEED = 20261121
COMPONENTS = ("unet", "vae", "text_encoder")


def cache_dir() -> Path:
    """``$STREAMEXEC_CACHE``, else ``$XDG_CACHE_HOME/streamexec``, else ``~/.cache/streamexec``."""
    if os.environ.get("STREAMEXEC_CACHE"):
        return Path(os.environ["STREAMEXEC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "streamexec"


def demo_path() -> Path:
    return cache_dir() / f"demo-v{DEMO_VERSION}"


def _values(name: str, shape: list[int]) -> np.ndarray:
    """Seeded values for one tensor, scaled so activations stay O(1) through the network."""
    seed = int.from_bytes(hashlib.blake2b(f"{DEMO_SEED}/{name}".encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    if len(shape) == 1:
        if name.endswith("weight") and "norm" in name:
            return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float16)
        return (0.02 * rng.standard_normal(shape)).astype(np.float16)
    if "embedding" in name:
        return (0.5 * rng.standard_normal(shape)).astype(np.float16)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float16)


def ensure_demo_model(log=None) -> Path:
    """The demo pipeline folder, built on first use (atomically: a crash leaves nothing half made)."""
    from safetensors.numpy import save_file

    target = demo_path()
    if (target / "model_index.json").is_file():
        return target
    spec = REFERENCE_DIR / "demo"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    except OSError as e:
        raise StreamexecError(f"cannot create the demo model under {target.parent}: {e.strerror} "
                              "(set STREAMEXEC_CACHE to a writable folder)") from None
    if log:
        log(f"building the demo model (random weights, one time) in {target} ...")
    try:
        for comp in COMPONENTS:
            (tmp / comp).mkdir()
            shutil.copy(spec / comp / "config.json", tmp / comp / "config.json")
            shapes = json.loads((spec / comp / "shapes.json").read_text())
            prefix = "text_model." if comp == "text_encoder" else ""
            tensors = {prefix + k: _values(prefix + k, v) for k, v in shapes["tensors"].items()}
            save_file(tensors, str(tmp / comp / shapes["file"]), metadata={"format": "pt"})
        shutil.copytree(REFERENCE_DIR / "sd15" / "tokenizer", tmp / "tokenizer")
        shutil.copytree(REFERENCE_DIR / "sd15" / "scheduler", tmp / "scheduler")
        shutil.copy(spec / "model_index.json", tmp / "model_index.json")
        (tmp / "README.txt").write_text(
            "streamexec demo model: SD 1.5 architecture at toy size with RANDOM weights (images are noise).\n"
            "Point 'streamexec plan' / 'streamexec run' at a real SD 1.5 or FLUX.1 folder for real images.\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "model_index.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
