"""Stable Diffusion 1.5 text-to-image and img2img: the math of diffusers' ``StableDiffusionPipeline``
and ``StableDiffusionImg2ImgPipeline``, with each component streamed inside the memory budget.

Stages: ``text_encoder`` (prompt and negative prompt as one batch of 2, held), ``vae_encode``
(img2img only), ``denoise`` (the UNet at batch 2 per call with classifier-free guidance
``uncond + s * (cond - uncond)``; batch 1 without CFG when ``cfg_scale <= 1``, as diffusers), ``vae``.

Default steps: 25. diffusers defaults to 50; on a CPU every UNet call costs seconds to minutes, and
with the default PNDM/DPM-type samplers 25 steps give nearly the same picture for half the time.

img2img: the init image is encoded and the VAE posterior is *sampled*, ``mean + std * noise``, as
diffusers does (``latent_dist.sample(generator)``), with ``noise`` from ``posterior_noise(seed)``;
then ``add_noise`` with the initial noise (``latents_in`` if given) at ``img2img_start(strength)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StreamexecError
from ..weights.checkpoint import Checkpoint
from .common import (
    F32,
    Pipeline,
    ProgressFn,
    Request,
    Result,
    StepFn,
    initial_noise,
    posterior_noise,
    resolve_size,
    to_uint8,
)
from .schedulers import SD15_SCHEDULER_CONFIG, make_scheduler, read_scheduler_config
from .tokenizers import clip_tokenizer, text_vocab_size

DEFAULT_STEPS = 25
DEFAULT_CFG = 7.5


class SD15Pipeline(Pipeline):
    """SD 1.5 (and other SD 1.x-shaped UNet/CLIP/VAE pipelines)."""

    kind = "sd15"
    components = ("text_encoder", "unet", "vae")
    default_cfg = DEFAULT_CFG

    def __init__(self, ckpt: Checkpoint, root: Path, memory_budget: int | str | None, scratch_dir: str | None,
                 tokenizer: str | Path | None = None) -> None:
        super().__init__(ckpt, root, memory_budget, scratch_dir)
        self.tokenizer = clip_tokenizer(root, tokenizer, text_vocab_size(self.models["text_encoder"]))
        sched = root / "scheduler" / "scheduler_config.json" if root.is_dir() else None
        self.scheduler_config = read_scheduler_config(sched) if sched and sched.is_file() else dict(
            SD15_SCHEDULER_CONFIG)

    def default_steps(self) -> int:
        return DEFAULT_STEPS

    def latent_channels(self) -> int:
        return int(self.models["unet"].config.get("in_channels", 4))

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE's factor times the UNet's downsampling (64 for SD
        1.5; diffusers also takes multiples of 8 by resizing skip connections, streamexec's UNet does not)."""
        blocks = self.models["unet"].config.get("block_out_channels") or [0] * 4
        return self.vae_scale_factor * 2 ** (len(blocks) - 1)

    def resolve(self, req: Request) -> dict[str, Any]:
        """The request with defaults filled in (what ``Result.parameters`` records)."""
        if req.guidance is not None:
            raise StreamexecError("guidance is FLUX.1-dev's; SD 1.5 takes cfg_scale")
        if req.max_sequence_length is not None:
            raise StreamexecError("max_sequence_length is FLUX's T5 setting; SD 1.5's CLIP always takes 77 tokens")
        p: dict[str, Any] = {
            "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed,
            "steps": self.default_steps() if req.steps is None else req.steps,
            "cfg_scale": self.default_cfg if req.cfg_scale is None else float(req.cfg_scale),
            "model": self.name, "kind": self.kind,
        }
        if req.init_image is not None:
            img = np.asarray(req.init_image)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise StreamexecError(f"init_image must be uint8 [H, W, 3], got {img.dtype} {list(img.shape)}")
            f = self.size_multiple
            h = img.shape[0] - img.shape[0] % f if req.height is None else req.height
            w = img.shape[1] - img.shape[1] % f if req.width is None else req.width
            p["height"], p["width"] = resolve_size(Request("", height=h, width=w), 0, f, "the image size")
            p["strength"] = float(req.strength)
        else:
            p["height"], p["width"] = resolve_size(req, self.native_size(), self.size_multiple, "SD 1.5")
        return p

    def __call__(self, req: Request, progress: ProgressFn | None = None, on_step: StepFn | None = None,
                 start_step: int = 0, start_latents: np.ndarray | None = None,
                 start_state: dict[str, np.ndarray] | None = None) -> Result:
        p = self.describe(req)
        sched = self.scheduler(req, p)
        seconds: dict[str, float] = {}
        self._bytes = 0
        cfg = p["cfg_scale"] > 1.0
        f = self.vae_scale_factor
        shape = (1, int(self.models["unet"].config.get("in_channels", 4)), p["height"] // f, p["width"] // f)
        noise = self._noise(req, shape)
        first = sched.img2img_start(p["strength"]) if req.init_image is not None else 0

        with self._stage("text_encoder", 1, seconds, progress, ("text_encoder",)):
            ids = self.tokenizer.encode([req.negative_prompt, req.prompt] if cfg else [req.prompt])
            ctx, _ = self._call("text_encoder", input_ids=ids)
            if progress is not None:
                progress("text_encoder", 1, 1)

        vae = self.models["vae"]
        if req.init_image is not None and not start_step:
            with self._stage("vae_encode", 1, seconds, progress, ("vae",)):
                x0 = self._encode(req, p, shape)
                if progress is not None:
                    progress("vae_encode", 1, 1)
            x = sched.add_noise(x0, noise, first)
        else:
            x = noise * F32(sched.init_noise_sigma) if req.init_image is None else noise

        s = F32(p["cfg_scale"])

        def unet(x: np.ndarray, i: int) -> np.ndarray:
            inp = sched.scale_model_input(x, i)
            if cfg:
                inp = np.concatenate([inp, inp])
            eps = self._call("unet", sample=inp, timestep=sched.timesteps[i], encoder_hidden_states=ctx)
            if not cfg:
                return eps
            return eps[:1] + s * (eps[1:] - eps[:1])

        with self._stage("denoise", 0, seconds, None, ("unet",)):
            x = self._denoise(sched, x, first, unet, req.seed, progress, on_step, start_step, start_latents,
                              start_state)

        with self._stage("vae", 1, seconds, progress, (self.decoder,)):
            if self.decoder == "taesd":
                decoded = self.tiny_decode(x)
            else:
                decoded = self._call("vae", x / F32(vae.scaling_factor), method="decode")
            if progress is not None:
                progress("vae", 1, 1)
        self._sched = None
        return Result(image=to_uint8(decoded), latents=x, stage_seconds=seconds, bytes_streamed=self._bytes,
                      parameters=p)

    def scheduler(self, req: Request, params: dict[str, Any]) -> Any:
        return make_scheduler(req.sampler, self.scheduler_config, params["steps"], karras=True if req.karras else None,
                              eta=req.eta, spacing=req.timestep_spacing)

    def _noise(self, req: Request, shape: tuple[int, ...]) -> np.ndarray:
        if req.latents_in is None:
            return initial_noise(req.seed, shape)
        lat = np.asarray(req.latents_in, dtype=F32)
        if lat.shape != shape:
            raise StreamexecError(f"latents_in has shape {list(lat.shape)}; this run needs {list(shape)}")
        return lat

    def _encode(self, req: Request, p: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
        """``scaling_factor * latent_dist.sample()`` of the init image, resized like diffusers (Lanczos)."""
        img = np.asarray(req.init_image)
        if img.shape[:2] != (p["height"], p["width"]):
            from PIL import Image

            img = np.asarray(Image.fromarray(img).resize((p["width"], p["height"]), Image.LANCZOS))
        x = (img.astype(F32) / F32(255.0)) * F32(2.0) - F32(1.0)
        moments = self._call("vae", np.ascontiguousarray(x.transpose(2, 0, 1)[None]), method="encode_moments")
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(F32(0.5) * np.clip(logvar, F32(-30.0), F32(20.0)))
        sample = mean + std * posterior_noise(req.seed, mean.shape)
        if sample.shape != shape:
            raise StreamexecError(f"the VAE encodes to {list(sample.shape)}, the UNet takes {list(shape)}")
        return F32(self.models["vae"].scaling_factor) * sample
