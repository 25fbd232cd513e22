"""What the SD 1.5 and FLUX text-to-image pipelines share: the request/result types, the seeded noise,
the pipeline base (its components opened as streamed models, one stage run inside the budget),
resumable sampler state. Which subclass a model folder gets is decided in ``generate.py``.

Noise is drawn with numpy from the seed alone, so a run is reproducible bit for bit and a run resumed
after step ``k`` sees exactly the noise the uninterrupted run would have seen:

- initial noise (txt2img latents, img2img ``add_noise``): ``np.random.default_rng(seed)``;
- per-step noise of ancestral samplers, call ``i``: ``np.random.default_rng([seed, 1, i])``;
- the VAE posterior sample of img2img: ``np.random.default_rng([seed, 2])``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..api import model_class
from ..errors import StreamexecError
from ..models.registry import default_size, vae_scale
from ..weights.checkpoint import Checkpoint

F32 = np.float32

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
StepFn = Callable[[int, np.ndarray], None]  # (denoiser call just finished, latents after it)


@dataclass
class Request:
    """One image to generate. ``None`` fields take the model's defaults (see ``Pipeline.resolve``)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None  # default: 25 SD 1.5 (diffusers' 50 is slow on CPU), 4 schnell, 28 dev
    cfg_scale: float | None = None  # SD 1.5 classifier-free guidance, default 7.5 (<= 1: no CFG batch)
    guidance: float | None = None  # FLUX dev distilled guidance, default 3.5
    sampler: str | None = None  # euler, euler_a, ddim, dpmpp_2m, pndm, lcm, tcd; None = the checkpoint's scheduler
    karras: bool = False
    timestep_spacing: str | None = None  # leading, linspace, trailing, sgm_uniform; None = the config's
    eta: float | None = None  # ddim (default 0) and tcd (default 0.3): share of fresh noise per step
    height: int | None = None  # default: the model's native size
    width: int | None = None
    init_image: np.ndarray | None = None  # img2img (SD 1.5): uint8 [H, W, 3]
    strength: float = 0.75
    latents_in: np.ndarray | None = None  # diffusers' latents= (SD: [1,C,h,w]; FLUX: packed [1, h/2*w/2, 4C])
    max_sequence_length: int | None = None  # T5: 256 schnell / 512 dev


@dataclass
class Result:
    """The generated image and how it was made."""

    image: np.ndarray  # uint8 [H, W, 3]
    latents: np.ndarray  # final latents before the VAE (SD: [1,4,h,w]; FLUX: packed)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    bytes_streamed: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise StreamexecError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    return int(seed)


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The run's starting noise (diffusers' ``latents=`` before ``init_noise_sigma``; FLUX: before packing)."""
    return np.random.default_rng(_check_seed(seed)).standard_normal(shape, dtype=F32)


def step_noise(seed: int, i: int, shape: tuple[int, ...]) -> np.ndarray:
    """Fresh noise an ancestral sampler adds at denoiser call ``i`` (independent of earlier calls)."""
    return np.random.default_rng([_check_seed(seed), 1, int(i)]).standard_normal(shape, dtype=F32)


def posterior_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Noise of img2img's VAE posterior sample ``mean + std * noise``."""
    return np.random.default_rng([_check_seed(seed), 2]).standard_normal(shape, dtype=F32)


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE output [1, 3, H, W] in [-1, 1] → uint8 [H, W, 3], as diffusers' postprocess + ``numpy_to_pil``."""
    x = np.clip(decoded[0] / F32(2) + F32(0.5), 0, 1)
    return np.ascontiguousarray((x.transpose(1, 2, 0) * F32(255)).round().astype(np.uint8))


# -- the pipeline base -----------------------------------------------------------------------------
class Pipeline:
    """A text-to-image pipeline over one checkpoint; ``generate.open_pipeline(path)`` returns the right
    subclass.

    Components are opened once (headers only). At run time each stage streams its component within
    the memory budget and releases that component's pages when the stage ends; text embeddings
    (small) are held through the denoise loop.
    """

    kind = ""
    #: components the pipeline needs, in the order they run
    components: tuple[str, ...] = ()

    def __init__(self, ckpt: Checkpoint, root: Path, memory_budget: int | str | None,
                 scratch_dir: str | None) -> None:
        self.checkpoint = ckpt
        self.root = root
        self.name = root.stem if root.is_file() else root.name
        self.memory_budget = memory_budget
        self.models: dict[str, Any] = {}
        missing = [c for c in self.components if c not in ckpt.components]
        if missing:
            from ..weights.roles import FLAGS, role_of

            what = {"sd15": "an SD 1.5", "sdxl": "an SDXL"}.get(self.kind, "a FLUX.1")
            raise StreamexecError(
                f"{root}: {what} run needs {', '.join(self.components)}; it has {', '.join(ckpt.components)}, "
                f"missing {', '.join(_missing_hint(c, self.kind, FLAGS, role_of) for c in missing)} "
                "(or point at a diffusers pipeline folder, an all-in-one file or a folder holding all the files)")
        for c in self.components:
            self.models[c] = model_class(ckpt.components[c])(ckpt, ckpt.components[c], memory_budget, None, scratch_dir)
        self._sched: Any = None
        self._bytes = 0
        self._graph_bytes: dict[int, int] = {}
        self._scratch_dir = scratch_dir

    def set_loras(self, loras: list[tuple[str | Path, float]]) -> None:
        """Apply LoRA files ``[(path, weight), ...]`` to the components they have modules for
        (UNet, text encoder); each file is read once. Raises LoraError when a file has nothing
        for this pipeline, matches nothing, or does not fit."""
        from ..weights.lora import lora_factors, read_loras

        files = read_loras(loras, list(self.models), f"{self.kind} pipeline")
        for name, m in self.models.items():
            shapes = {k: t.shape for k, t in m.store.tensors.items()}
            m.store.set_lora(lora_factors(files, name, shapes))

    def default_steps(self) -> int:
        raise NotImplementedError

    def native_size(self) -> int:
        """The image side the model was trained at (``models.registry.default_size``)."""
        return default_size({name: m.config for name, m in self.models.items()})

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (``models.registry.vae_scale``; 8 for SD/FLUX)."""
        return vae_scale(self.models["vae"].config)

    def resolve(self, req: Request) -> dict[str, Any]:
        """The request checked, with the model's defaults filled in."""
        raise NotImplementedError

    def scheduler(self, req: Request, params: dict[str, Any]) -> Any:
        """A fresh sampler for this request (``params`` from :meth:`resolve`)."""
        raise NotImplementedError

    def latent_channels(self) -> int:
        """Channels of the latents the VAE decodes (4 for SD 1.5, 16 for FLUX)."""
        raise NotImplementedError

    def use_tiny_decoder(self, path: str | Path) -> None:
        """Decode with the tiny VAE decoder (diffusers' AutoencoderTiny: TAESD, TAESDXL, TAEF1) in
        ``path`` instead of the full VAE: the final image, and :meth:`preview` images."""
        from ..api import load

        tiny = load(path, component="taesd", memory_budget=self.memory_budget, scratch_dir=self._scratch_dir)
        first = tiny.weight_info("decoder.layers.0.weight")
        got, want = (first[0][1] if first else None), self.latent_channels()
        if got != want:
            tiny.close()
            raise StreamexecError(f"{path}: a tiny decoder for {got} latent channels; this model's latents have "
                                  f"{want} (TAESD/TAESDXL: 4, TAEF1: 16)")
        self.models["taesd"] = tiny

    @property
    def decoder(self) -> str:
        """The component that makes the final image: ``taesd`` if a tiny decoder is in use, else ``vae``."""
        return "taesd" if "taesd" in self.models else "vae"

    def spatial_latents(self, x: np.ndarray) -> np.ndarray:
        """The denoiser's latents as [1, C, h, w] (FLUX unpacks its tokens)."""
        return x

    def tiny_decode(self, x: np.ndarray) -> np.ndarray:
        """The tiny decoder's image of the denoiser's latents ``x``, in [-1, 1], scaled as diffusers
        pipelines hand latents to an AutoencoderTiny."""
        tiny = self.models["taesd"]
        return self._call("taesd", tiny.latents_from_model(self.spatial_latents(x)), method="decode")

    def preview(self, x: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] picture of latents ``x`` mid-run (needs :meth:`use_tiny_decoder`)."""
        if "taesd" not in self.models:
            raise StreamexecError("previews need a tiny decoder (use_tiny_decoder / --taesd)")
        return to_uint8(self.tiny_decode(x))

    def describe(self, req: Request) -> dict[str, Any]:
        """``Result.parameters`` of this request, without running anything (checks the request)."""
        _check_seed(req.seed)
        p = self.resolve(req)
        sched = self.scheduler(req, p)
        p["sampler"], p["karras"] = sched.name, bool(sched.karras)
        if req.timestep_spacing is not None:
            p["timestep_spacing"] = req.timestep_spacing
        if getattr(sched, "eta", 0.0) or req.eta is not None:
            p["eta"] = float(sched.eta)
        return p

    def resume_state(self) -> dict[str, np.ndarray]:
        """Inside ``on_step``: the sampler history to save beside the latents (empty for single-step
        samplers) and pass back as ``start_state`` to resume a multistep sampler (dpmpp_2m, pndm)."""
        return self._sched.state_dict() if self._sched is not None else {}

    def close(self) -> None:
        for m in self.models.values():
            m.store.release_all()
            m.store.close()
        self.checkpoint.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers for subclasses ------------------------------------------------------------------
    def _call(self, name: str, *args: Any, method: str = "__call__", **kwargs: Any) -> Any:
        """Run component ``name`` once, counting the weight bytes its graph streams."""
        m = self.models[name]
        out = getattr(m, method)(*args, **kwargs)
        graph = m.last_executor.graph
        n = self._graph_bytes.get(id(graph))
        if n is None:
            keys = {k for op in graph.ops for k in op.weights.values()}
            n = self._graph_bytes[id(graph)] = sum(m.store.nbytes(k) for k in keys)
        self._bytes += n
        return out

    @contextmanager
    def _stage(self, stage: str, total: int, seconds: dict[str, float], progress: ProgressFn | None,
               components: tuple[str, ...] = ()) -> Iterator[None]:
        """Time a stage, report its start, and free its components' pages when it ends."""
        t0 = time.perf_counter()
        if progress is not None:
            progress(stage, 0, total)
        try:
            yield
        finally:
            for c in components:
                self.models[c].store.release_all()
                self.models[c].store.close()
            gc.collect()
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0

    def _denoise(self, sched: Any, x: np.ndarray, first: int, model_fn: Callable[[np.ndarray, int], np.ndarray],
                 seed: int, progress: ProgressFn | None, on_step: StepFn | None, start_step: int,
                 start_latents: np.ndarray | None, start_state: dict[str, np.ndarray] | None) -> np.ndarray:
        """The sampler loop over denoiser calls ``first..len(timesteps)-1``, resumable at ``start_step``."""
        n = len(sched.timesteps)
        begin = first
        if start_step:
            if not first < start_step <= n:
                raise StreamexecError(f"start_step {start_step} is outside this run's denoiser calls {first + 1}..{n}")
            if start_latents is None:
                raise StreamexecError("resuming at start_step needs start_latents (the latents saved after the "
                                      "step before)")
            if np.shape(start_latents) != x.shape:
                raise StreamexecError(f"start_latents has shape {list(np.shape(start_latents))}, "
                                      f"this run's latents {list(x.shape)}")
            if sched.stateful:
                if start_state is None:
                    raise StreamexecError(f"resuming the {sched.name} sampler needs its history: save "
                                          "Pipeline.resume_state() with the latents and pass it as start_state")
                sched.load_state_dict(start_state)
            x = np.ascontiguousarray(start_latents, dtype=F32)
            begin = start_step
        self._sched = sched
        total = n - first
        if progress is not None:
            progress("denoise", begin - first, total)
        for i in range(begin, n):
            out = model_fn(x, i)
            noise = step_noise(seed, i, x.shape) if sched.needs_noise else None
            x = sched.step(out, i, x, noise=noise)
            if progress is not None:
                progress("denoise", i + 1 - first, total)
            if on_step is not None:
                on_step(i, x)
        return x


def resolve_size(req: Request, native: int, multiple: int, what: str) -> tuple[int, int]:
    """(height, width): the request's or the native size; each a positive multiple of ``multiple``."""
    h = native if req.height is None else req.height
    w = native if req.width is None else req.width
    for name, v in (("height", h), ("width", w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % multiple:
            raise StreamexecError(f"{name} {v!r}: {what} needs a positive multiple of {multiple}")
    return int(h), int(w)


def _missing_hint(component: str, kind: str, flags: dict[str, str], role_of: Callable[[str], str | None]) -> str:
    """``text_encoder_2 (--t5xxl FILE)``: the component and the flag that supplies it, where one does
    (SDXL's second text encoder, OpenCLIP bigG, has no flag of its own yet)."""
    role = role_of(component)
    if role is None or (kind == "sdxl" and component == "text_encoder_2"):
        return component
    return f"{component} ({flags[role]} FILE)"
