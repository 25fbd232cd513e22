"""FLUX.1 (schnell / dev) text-to-image: the math of diffusers' ``FluxPipeline``, with each component
streamed inside the memory budget.

Stages: ``text_encoder`` (CLIP pooled output, 77 tokens), ``text_encoder_2`` (T5 sequence,
``max_sequence_length`` tokens: 256 schnell, 512 dev), ``denoise`` (the transformer once per step on
2×2-packed latents with ``_prepare_latent_image_ids`` / zero text ids; flow-matching Euler with the
config's shift — static for schnell, ``mu`` from the image's token count for dev; timestep = sigma;
dev's distilled guidance embed, no CFG batch), ``vae`` (unpack, ``z / scaling_factor + shift_factor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NotImplementedYet, StreamexecError
from ..models.registry import T5_MAX_LEN, t5_text_len
from ..weights.checkpoint import Checkpoint
from .common import F32, Pipeline, ProgressFn, Request, Result, StepFn, initial_noise, resolve_size, to_uint8
from .schedulers import (
    FLUX_DEV_SCHEDULER_CONFIG,
    FLUX_SCHNELL_SCHEDULER_CONFIG,
    make_scheduler,
    read_scheduler_config,
)
from .tokenizers import clip_tokenizer, t5_tokenizer, text_vocab_size

DEFAULT_GUIDANCE = 3.5


def pack_latents(z: np.ndarray) -> np.ndarray:
    """[B, C, h, w] → [B, h/2 * w/2, 4C] (``FluxPipeline._pack_latents``)."""
    b, c, h, w = z.shape
    return np.ascontiguousarray(
        z.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4))


def unpack_latents(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """[B, h/2 * w/2, 4C] → [B, C, h, w] (``FluxPipeline._unpack_latents``; h, w in latent pixels)."""
    b, _, ch = x.shape
    return np.ascontiguousarray(
        x.reshape(b, h // 2, w // 2, ch // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, ch // 4, h, w))


def latent_image_ids(h2: int, w2: int) -> np.ndarray:
    """[h2 * w2, 3]: (0, row, column) per packed token (``_prepare_latent_image_ids``)."""
    ids = np.zeros((h2, w2, 3), dtype=F32)
    ids[..., 1] = np.arange(h2, dtype=F32)[:, None]
    ids[..., 2] = np.arange(w2, dtype=F32)[None, :]
    return ids.reshape(h2 * w2, 3)


def _t5_vocab_size(model: Any) -> int | None:
    v = model.config.get("vocab_size")
    if v is None:
        info = model.weight_info("encoder.embed_tokens.weight")
        v = info[0][0] if info else None
    return None if v is None else int(v)


class FluxPipeline(Pipeline):
    """FLUX.1-schnell (no guidance embedder) and FLUX.1-dev (guidance-distilled)."""

    kind = "flux"
    components = ("text_encoder", "text_encoder_2", "transformer", "vae")

    def __init__(self, ckpt: Checkpoint, root: Path, memory_budget: int | str | None, scratch_dir: str | None,
                 tokenizer: str | Path | None = None) -> None:
        super().__init__(ckpt, root, memory_budget, scratch_dir)
        self.dev = bool(self.models["transformer"].has_guidance)
        self.variant = "dev" if self.dev else "schnell"
        self.t5_tokenizer = t5_tokenizer(tokenizer, root if root.is_dir() else root.parent,
                                         _t5_vocab_size(self.models["text_encoder_2"]))
        self.tokenizer = clip_tokenizer(root, tokenizer, text_vocab_size(self.models["text_encoder"]), flux=True)
        sched = root / "scheduler" / "scheduler_config.json" if root.is_dir() else None
        if sched is not None and sched.is_file():
            self.scheduler_config = read_scheduler_config(sched)
        else:
            self.scheduler_config = dict(FLUX_DEV_SCHEDULER_CONFIG if self.dev else FLUX_SCHNELL_SCHEDULER_CONFIG)

    def default_steps(self) -> int:
        return 28 if self.dev else 4

    def resolve(self, req: Request) -> dict[str, Any]:
        """The request with defaults filled in (what ``Result.parameters`` records)."""
        if req.negative_prompt:
            raise StreamexecError("FLUX.1 takes no negative prompt (it runs without classifier-free guidance)")
        if req.cfg_scale is not None:
            raise StreamexecError("FLUX.1 has no classifier-free guidance: use guidance (FLUX.1-dev) instead of "
                                  "cfg_scale")
        if req.init_image is not None:
            raise NotImplementedYet("img2img (init_image) is implemented for SD 1.5 only, not FLUX yet")
        if req.guidance is not None and not self.dev:
            raise StreamexecError("this FLUX model (schnell) has no guidance embedder: leave guidance unset")
        msl = req.max_sequence_length or t5_text_len(self.dev)
        if not 1 < msl <= T5_MAX_LEN:
            raise StreamexecError(f"max_sequence_length {msl}: FLUX's T5 takes 2..{T5_MAX_LEN} tokens")
        p: dict[str, Any] = {
            "prompt": req.prompt, "seed": req.seed,
            "steps": self.default_steps() if req.steps is None else req.steps,
            "max_sequence_length": msl, "model": self.name, "kind": f"flux-{self.variant}",
        }
        if self.dev:
            p["guidance"] = DEFAULT_GUIDANCE if req.guidance is None else float(req.guidance)
        p["height"], p["width"] = resolve_size(req, self.native_size(), 2 * self.vae_scale_factor, "FLUX")
        return p

    def latent_channels(self) -> int:
        tr = self.models["transformer"]
        info = tr.weight_info("x_embedder.weight")  # a single file has no config: its input width
        return int(tr.config.get("in_channels") or (info[0][1] if info else 64)) // 4

    def spatial_latents(self, x: np.ndarray) -> np.ndarray:
        return unpack_latents(x, *self._latent_hw)

    def scheduler(self, req: Request, params: dict[str, Any]) -> Any:
        f = self.vae_scale_factor
        tokens = (params["height"] // (2 * f)) * (params["width"] // (2 * f))
        return make_scheduler(req.sampler, self.scheduler_config, params["steps"], karras=True if req.karras else None,
                              eta=req.eta, spacing=req.timestep_spacing, image_seq_len=tokens)

    def __call__(self, req: Request, progress: ProgressFn | None = None, on_step: StepFn | None = None,
                 start_step: int = 0, start_latents: np.ndarray | None = None,
                 start_state: dict[str, np.ndarray] | None = None) -> Result:
        p = self.describe(req)
        f = self.vae_scale_factor
        h, w = p["height"] // f, p["width"] // f
        self._latent_hw = (h, w)
        channels = self.latent_channels()
        packed = (1, (h // 2) * (w // 2), channels * 4)
        if req.latents_in is None:
            x = pack_latents(initial_noise(req.seed, (1, channels, h, w)))
        else:
            x = np.ascontiguousarray(req.latents_in, dtype=F32)
            if x.shape != packed:
                raise StreamexecError(f"latents_in has shape {list(x.shape)}; this run needs packed {list(packed)}")
        sched = self.scheduler(req, p)
        seconds: dict[str, float] = {}
        self._bytes = 0

        with self._stage("text_encoder", 1, seconds, progress, ("text_encoder",)):
            _, pooled = self._call("text_encoder", input_ids=self.tokenizer.encode([req.prompt]))
            if progress is not None:
                progress("text_encoder", 1, 1)
        with self._stage("text_encoder_2", 1, seconds, progress, ("text_encoder_2",)):
            ids = self.t5_tokenizer.encode([req.prompt], max_length=p["max_sequence_length"])
            t5 = self._call("text_encoder_2", input_ids=ids)
            if progress is not None:
                progress("text_encoder_2", 1, 1)

        img_ids = latent_image_ids(h // 2, w // 2)
        txt_ids = np.zeros((t5.shape[1], 3), dtype=F32)
        guidance = np.full(1, p["guidance"], dtype=F32) if self.dev else None

        def transformer(x: np.ndarray, i: int) -> np.ndarray:
            t = np.asarray(sched.timesteps[i], F32) / F32(1000)
            return self._call("transformer", hidden_states=x, encoder_hidden_states=t5, pooled_projections=pooled,
                              timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance)

        with self._stage("denoise", 0, seconds, None, ("transformer",)):
            x = self._denoise(sched, x, 0, transformer, req.seed, progress, on_step, start_step, start_latents,
                              start_state)

        vae = self.models["vae"]
        with self._stage("vae", 1, seconds, progress, (self.decoder,)):
            if self.decoder == "taesd":
                decoded = self.tiny_decode(x)
            else:
                z = unpack_latents(x, h, w) / F32(vae.scaling_factor) + F32(vae.shift_factor or 0.0)
                decoded = self._call("vae", z, method="decode")
            if progress is not None:
                progress("vae", 1, 1)
        self._sched = None
        return Result(image=to_uint8(decoded), latents=x, stage_seconds=seconds, bytes_streamed=self._bytes,
                      parameters=p)
