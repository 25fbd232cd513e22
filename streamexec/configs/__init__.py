"""The published configs of SD 1.5, FLUX.1-schnell and FLUX.1-dev (model_index, component
config.json, scheduler config) and SD 1.5's CLIP tokenizer files — no weights. They are the
defaults for single-file checkpoints, which carry no config, and the reference shapes for tests
and tools. Copied from the published Hugging Face repositories (runwayml/stable-diffusion-v1-5,
black-forest-labs/FLUX.1-schnell and FLUX.1-dev); the CLIP BPE files are OpenAI's (MIT)."""

from __future__ import annotations

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent
PRESETS = ("sd15", "flux-schnell", "flux-dev")


def reference(name: str) -> Path:
    """The folder of a shipped reference pipeline (``sd15``, ``flux-schnell``, ``flux-dev``)."""
    if name not in PRESETS:
        raise KeyError(f"no shipped reference {name!r} (have: {', '.join(PRESETS)})")
    return REFERENCE_DIR / name
