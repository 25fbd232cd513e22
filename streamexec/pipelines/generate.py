"""Text-to-image generation: ``open_pipeline(model)`` → an SD 1.5 or FLUX.1 pipeline, called with a
:class:`Request`, returning a :class:`Result`::

    from streamexec.pipelines.generate import Request, open_pipeline

    with open_pipeline("sd15/", memory_budget="1G") as pipe:
        res = pipe(Request("a lighthouse at dusk", seed=7), progress=lambda stage, done, total: ...)
    res.image            # uint8 [H, W, 3]

Same math as diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` /
``FluxPipeline`` (parity-tested in ``tests/test_pipelines.py``); the implementation lives in
``common.py`` (types, noise, stages, resume), ``sd15.py`` and ``flux.py``.

Progress: ``progress(stage, done, total)`` at each stage's start (``done`` 0, or the resumed step) and
after each unit of work: stages ``text_encoder``, ``text_encoder_2`` (FLUX), ``vae_encode`` (img2img),
``denoise`` (one unit per denoiser call; PNDM makes ``steps + 1`` calls, as in diffusers; img2img
runs only the last ``strength`` part), ``vae``. ``Result.stage_seconds`` has the same keys.

Resume: ``on_step(i, latents)`` after denoiser call ``i`` (an index into the sampler's timesteps);
``pipe(req, start_step=i + 1, start_latents=latents)`` continues and ends with the same latents as
the uninterrupted run (per-step noise is drawn from ``(seed, i)``, see ``common``). The multistep
samplers (dpmpp_2m, pndm) also need their history: save ``pipe.resume_state()`` inside ``on_step``
and pass it back as ``start_state=``.

``Result.bytes_streamed``: the stored bytes of every weight each component call's graph reads,
summed over all calls (text encoders once, the denoiser once per call, the VAE once) — what the run
streams through the process, whether the pages came from the page cache or the disk.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import StreamexecError
from ..models.registry import is_flux
from ..sizes import parse_budget
from ..weights.roles import assemble
from .common import (
    Pipeline,
    ProgressFn,
    Request,
    Result,
    StepFn,
    initial_noise,
    posterior_noise,
    step_noise,
)
from .flux import FluxPipeline
from .sd15 import SD15Pipeline
from .sdxl import SDXLPipeline, is_sdxl

__all__ = [
    "FluxPipeline",
    "Pipeline",
    "ProgressFn",
    "Request",
    "Result",
    "SD15Pipeline",
    "SDXLPipeline",
    "StepFn",
    "initial_noise",
    "open_pipeline",
    "posterior_noise",
    "step_noise",
]


def open_pipeline(model: str | Path | None, *, memory_budget: int | str | None = None,
                  tokenizer: str | Path | None = None, variant: str | None = None, scratch_dir: str | None = None,
                  files: dict[str, str | Path | None] | None = None) -> Pipeline:
    """Open a diffusers pipeline folder (``model_index.json``) or an SD 1.5 single ``.safetensors``
    file as the pipeline that runs it: FLUX when it has a ``transformer``, SDXL when its UNet takes
    ``text_time`` conditioning, else SD 1.x/2.x.
    ``memory_budget`` as ``sizes.parse_budget`` reads it (a size, ``auto``, ``min`` or None).
    ``tokenizer``: a folder with the tokenizer files when the model has none (the shipped CLIP BPE
    and T5 vocabulary otherwise). ``files``: one file per role, ``diffusion_model``, ``vae``,
    ``clip_l``, ``t5xxl`` (``weights.roles``), each adding or replacing that component of ``model``;
    ``model`` may be None when ``diffusion_model`` is given."""
    budget = parse_budget(memory_budget)
    ckpt = assemble(model, files or {}, variant=variant)
    root = Path(ckpt.root)
    try:
        if ckpt.kind == "component":
            raise StreamexecError(f"{root}: a single component folder; a run needs the whole pipeline folder "
                                  "(the one with model_index.json)")
        sub = FluxPipeline if is_flux(ckpt.components) else SDXLPipeline if is_sdxl(ckpt) else SD15Pipeline
        return sub(ckpt, root, budget, scratch_dir, tokenizer)
    except BaseException:
        ckpt.close()
        raise
