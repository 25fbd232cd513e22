"""The published configs of SD 1.5, SD 2.1 (768-v), SDXL 1.0 base, FLUX.1-schnell and FLUX.1-dev (model_index, component
config.json, scheduler config), SD 1.5's CLIP tokenizer files and FLUX.1's T5 v1.1 tokenizer
(``flux-schnell/tokenizer_2/``) — no weights. They are the defaults for single-file checkpoints,
which carry no config or tokenizer, and the reference shapes for tests and tools. Copied from the
published Hugging Face repositories (runwayml/stable-diffusion-v1-5, black-forest-labs/FLUX.1-schnell,
FLUX.1-dev, stabilityai/stable-diffusion-2-1 and stable-diffusion-xl-base-1.0); the CLIP BPE files
are OpenAI's (MIT), the T5 vocabulary Google's (Apache 2.0). SD 2.1's and SDXL's tokenizer folders hold
only their tokenizer_config/special_tokens_map (both pad with ``!``): their BPE files are SD 1.5's."""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent
PRESETS = ("sd15", "sd21", "sdxl", "flux-schnell", "flux-dev")


def reference(name: str) -> Path:
    """The folder of a shipped reference pipeline (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise KeyError(f"no shipped reference {name!r} (have: {', '.join(PRESETS)})")
    return REFERENCE_DIR / name


def default_config(component: str, tensors: dict, *, sdxl: bool = False) -> dict | None:
    """The published config a single file of this component most likely comes from (single files
    carry none): SD 1.5's UNet and CLIP, SD 1.5's or FLUX's VAE by its latent channels; SDXL's UNet
    (a ``text_time`` UNet), OpenCLIP bigG and — for a whole SDXL file (``sdxl``) — VAE. The builders
    still check every weight shape against it. FLUX and T5 single files get None: their builders
    read depth and widths from the weights."""
    if component == "unet" and (sdxl or "add_embedding.linear_1.weight" in tensors):
        return _load("sdxl/unet")
    if component == "text_encoder_2" and "text_model.embeddings.token_embedding.weight" in tensors:
        return _load("sdxl/text_encoder_2")
    if component in ("unet", "text_encoder"):
        return _load(f"sdxl/{component}" if sdxl else f"sd15/{component}")
    if component == "vae":
        conv_in = tensors.get("decoder.conv_in.weight")
        latent = conv_in.shape[1] if conv_in is not None else 4
        return _load("flux-schnell/vae" if latent == 16 else "sdxl/vae" if sdxl else "sd15/vae")
    return None


def _load(rel: str) -> dict:
    cfg = json.loads((REFERENCE_DIR / rel / "config.json").read_text())
    cfg["_streamexec_default"] = f"streamexec/configs/{rel}/config.json"
    return cfg
