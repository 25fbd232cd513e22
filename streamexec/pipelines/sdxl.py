"""Stable Diffusion XL text-to-image: the math of diffusers' ``StableDiffusionXLPipeline``, with each
component streamed inside the memory budget.

Stages: ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (OpenCLIP bigG with projection), each giving
its penultimate hidden state (``hidden_states[-2]``); the two are concatenated into the 2048-wide
context, and bigG's projected pooled output is the UNet's ``text_embeds``. ``denoise``: the UNet with
``time_ids`` = (height, width, 0, 0, height, width) — original size, crop top-left, target size, as
diffusers' defaults — and classifier-free guidance ``uncond + s * (cond - uncond)``. An empty negative
prompt gives zero embeddings when the model says ``force_zeros_for_empty_prompt`` (SDXL base does),
as diffusers does when no negative prompt is passed. ``vae``: latents / ``scaling_factor`` (0.13025).

Defaults: 25 steps (diffusers 50; see sd15.py), CFG 5.0 (diffusers' default). Text-to-image only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StreamexecError
from ..weights.checkpoint import Checkpoint
from .common import F32, ProgressFn, Request, Result, StepFn, to_uint8
from .schedulers import read_scheduler_config
from .sd15 import SD15Pipeline
from .tokenizers import SHIPPED_CLIP_TOKENIZER, CLIPTokenizer

DEFAULT_CFG = 5.0
#: SDXL base's scheduler (EulerDiscreteScheduler, leading spacing) when the folder has none.
SDXL_SCHEDULER = Path(__file__).resolve().parents[1] / "configs" / "sdxl" / "scheduler" / "scheduler_config.json"


def bang_padded(tok: CLIPTokenizer) -> CLIPTokenizer:
    """SDXL's tokenizer_2 for a single file (no tokenizer folder): the same BPE, padded with ``!``
    as the published ``tokenizer_2`` pads."""
    if tok.folder.resolve() != SHIPPED_CLIP_TOKENIZER.resolve():
        raise StreamexecError(f"{tok.folder}: SDXL needs a tokenizer_2/ folder beside this one")
    out = CLIPTokenizer.from_dir(SHIPPED_CLIP_TOKENIZER)
    out.pad_id = out._tok.token_to_id("!")  # 0: the token "!", as transformers looks up pad_token
    return out


def is_sdxl(ckpt: Checkpoint) -> bool:
    """An SDXL checkpoint: its UNet takes ``text_time`` added conditioning."""
    unet = ckpt.components.get("unet")
    return unet is not None and (unet.config or {}).get("addition_embed_type") == "text_time"


class SDXLPipeline(SD15Pipeline):
    """SDXL base (and SDXL-Turbo): two CLIP text encoders, size/crop conditioning."""

    kind = "sdxl"
    components = ("text_encoder", "text_encoder_2", "unet", "vae")
    default_cfg = DEFAULT_CFG

    def __init__(self, ckpt: Checkpoint, root: Path, memory_budget: int | str | None, scratch_dir: str | None,
                 tokenizer: str | Path | None = None) -> None:
        super().__init__(ckpt, root, memory_budget, scratch_dir, tokenizer)
        folder = root / "tokenizer_2"
        self.tokenizer_2 = CLIPTokenizer.from_dir(folder) if root.is_dir() and folder.is_dir() else \
            bang_padded(self.tokenizer)
        index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
        self.force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        if not (root / "scheduler" / "scheduler_config.json").is_file():
            self.scheduler_config = read_scheduler_config(SDXL_SCHEDULER)

    def resolve(self, req: Request) -> dict[str, Any]:
        if req.init_image is not None:
            raise StreamexecError("SDXL img2img is not supported yet (text-to-image only)")
        return super().resolve(req)

    def _encode_text(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(context [B, 77, 768 + 1280], pooled [B, 1280]) of ``texts``."""
        h1, _ = self._call("text_encoder", input_ids=self.tokenizer.encode(texts), penultimate=True)
        h2, pooled = self._call("text_encoder_2", input_ids=self.tokenizer_2.encode(texts), penultimate=True)
        return np.concatenate([h1, h2], axis=-1), pooled

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
        x = self._noise(req, shape) * F32(sched.init_noise_sigma)

        with self._stage("text_encoder", 1, seconds, progress, ("text_encoder", "text_encoder_2")):
            zero_negative = cfg and not req.negative_prompt and self.force_zeros
            texts = [req.prompt] if not cfg or zero_negative else [req.negative_prompt, req.prompt]
            ctx, pooled = self._encode_text(texts)
            if zero_negative:
                ctx = np.concatenate([np.zeros_like(ctx), ctx])
                pooled = np.concatenate([np.zeros_like(pooled), pooled])
            if progress is not None:
                progress("text_encoder", 1, 1)
        ids = np.array([[p["height"], p["width"], 0, 0, p["height"], p["width"]]] * len(ctx), dtype=F32)
        s = F32(p["cfg_scale"])

        def unet(x: np.ndarray, i: int) -> np.ndarray:
            inp = sched.scale_model_input(x, i)
            if cfg:
                inp = np.concatenate([inp, inp])
            eps = self._call("unet", sample=inp, timestep=sched.timesteps[i], encoder_hidden_states=ctx,
                             text_embeds=pooled, time_ids=ids)
            if not cfg:
                return eps
            return eps[:1] + s * (eps[1:] - eps[:1])

        with self._stage("denoise", 0, seconds, None, ("unet",)):
            x = self._denoise(sched, x, 0, unet, req.seed, progress, on_step, start_step, start_latents, start_state)

        with self._stage("vae", 1, seconds, progress, ("vae",)):
            decoded = self._call("vae", x / F32(self.models["vae"].scaling_factor), method="decode")
            if progress is not None:
                progress("vae", 1, 1)
        self._sched = None
        return Result(image=to_uint8(decoded), latents=x, stage_seconds=seconds, bytes_streamed=self._bytes,
                      parameters=p)
