"""The public Python API: ``streamexec.load(path, component=..., memory_budget=...)``.

Argument names and outputs follow diffusers/transformers, numpy in and numpy out::

    eps = streamexec.load(p, component="unet")(sample=x, timestep=t, encoder_hidden_states=c)
    h, pooled = streamexec.load(p, component="text_encoder")(input_ids=ids)
    img = streamexec.load(p, component="vae").decode(z)           # and .encode(x)
    img = streamexec.load("taesd_decoder.safetensors").decode(z)  # tiny decoder (component "taesd")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import StreamexecError
from .models.graph import Graph
from .models.registry import is_clip, is_flux_dev, tiny_vae_scaling, vae_scaling_factor, vae_shift_factor
from .planner.fit import BASELINE_SLACK, Fit
from .planner.menus import ParamMenus
from .runtime.executor import Executor
from .runtime.process import measure_baseline
from .sizes import parse_budget
from .weights.checkpoint import Checkpoint, Component
from .weights.roles import assemble
from .weights.store import WeightStore


class StreamedModel:
    """A component of a checkpoint, run layer by layer. Graphs are built per input shape."""

    def __init__(self, ckpt: Checkpoint, comp: Component, memory_budget: int | str | None,
                 baseline: int | None = None, scratch_dir: str | None = None, *, strict: bool = False,
                 loras: list[tuple[str | Path, float]] | None = None) -> None:
        self.checkpoint = ckpt
        self.component = comp
        self.config = dict(comp.config or {})
        self.memory_budget = memory_budget
        self.baseline = baseline
        self._own_baseline = baseline is not None  # the caller's number, not this process's RSS
        #: the budget guard (runtime/guard.py; see ``_guard_limit`` for when it applies):
        #: ``strict`` raises BudgetExceeded naming the op when the process goes over the budget;
        #: otherwise the rest of the run is cut finer and the adapted schedule is kept for the
        #: next calls. ``guard = False`` runs exactly the plan, unchecked.
        self.strict = strict
        self.guard = True
        self.scratch_dir = scratch_dir
        self.store: WeightStore = ckpt.store(comp.name)
        if loras:
            self.set_loras(loras)
        self._graphs: dict[tuple, tuple[Graph, Fit]] = {}
        self.last_executor: Executor | None = None
        self.last_fit: Fit | None = None
        self.trace = False
        self._planned: list = []

    def set_loras(self, loras: list[tuple[str | Path, float]]) -> None:
        """Apply LoRA files ``[(path, weight), ...]`` (weights/lora.py formats) to this component:
        their factors stay separate and are merged panel by panel (``kernels.lora``). Raises
        LoraError when one matches nothing here or does not fit."""
        from .weights.lora import lora_factors, read_lora

        files = [(read_lora(p), float(w)) for p, w in loras]
        shapes = {k: t.shape for k, t in self.store.tensors.items()}
        self.store.set_lora(lora_factors(files, self.component.name, shapes))

    def weight_info(self, key: str):
        t = self.store.tensors.get(key)
        return None if t is None else (t.shape, t.dtype)

    def use_plan(self, graph: Graph, schedule, planned_baseline: int) -> None:
        """Run ``graph`` (from a saved plan) with exactly its ``schedule`` when a call has the
        plan's shapes — unless this process is bigger than the one the plan was made in, then
        the schedule is re-fitted to the budget."""
        self._planned.append((graph, schedule, planned_baseline))

    def _from_plan(self, graph: Graph) -> Fit | None:
        from .planner.fit import Fit

        for pg, sched, base in getattr(self, "_planned", []):
            same = len(pg.ops) == len(graph.ops) and all(
                a.kind == b.kind and a.weights == b.weights and pg.tensors[a.output] == graph.tensors[b.output]
                for a, b in zip(pg.ops, graph.ops))
            if not same:
                continue
            if self.baseline is None:
                self.baseline = process_baseline({t.dtype for t in self.store.tensors.values()})
            if self.baseline > base + BASELINE_SLACK:
                return None  # this process is bigger than the planning one: fit again
            peak = max(sched.planned_bytes.values(), default=0)
            return Fit(sched, [], self.memory_budget if isinstance(self.memory_budget, int) else peak, base, peak,
                       peak)
        return None

    def _run(self, key: tuple, build, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if key not in self._graphs:
            graph = build()
            self._graphs[key] = (graph, self._from_plan(graph) or self.fit(graph))
        graph, fit = self._graphs[key]
        self.last_fit = fit
        ex = Executor(graph, self.store, fit.schedule, trace=self.trace, scratch_dir=self.scratch_dir,
                      budget=self._guard_limit(fit), strict=self.strict, menus=ParamMenus(graph, self.store))
        self.last_executor = ex
        out = ex.run(feeds)
        if ex.schedule is not fit.schedule:  # the guard adapted it: the next calls start from there
            fit.schedule = ex.schedule
        return out

    def _guard_limit(self, fit: Fit) -> int | None:
        """The RSS bound the budget guard checks the process against, or None (no guard).

        A byte budget bounds the whole process when the baseline is this process's (measured, or
        the plan's): that is the bound; with ``"min"`` it is the planner's own smallest peak (what
        it claims the run takes). With a baseline of the caller's (``baseline=0``: "the model gets
        this much") the budget is not a bound on the process the OS could check — other threads,
        the caller's arrays, JIT code all share the RSS — so there is no guard."""
        if not self.guard or self._own_baseline:
            return None
        if isinstance(self.memory_budget, int):
            return self.memory_budget
        if self.memory_budget in ("min", "smallest") and isinstance(fit.budget, int):
            return fit.budget
        return None

    def fit(self, graph: Graph) -> Fit:
        """The schedule for ``graph`` within this model's budget (raises BudgetError if none)."""
        from .planner.fit import fit_schedule, weight_table

        if self.baseline is None:
            self.baseline = process_baseline({t.dtype for t in self.store.tensors.values()})
        return fit_schedule(graph, weight_table(self.store), self.memory_budget, self.baseline)

    def close(self) -> None:
        self.store.close()
        self.checkpoint.close()


_BASELINE: dict[frozenset, int] = {}


def process_baseline(dtypes: set[str]) -> int:
    """This process's RSS once the kernels for these weight dtypes are warm (measured once)."""
    key = frozenset(dtypes)
    if key not in _BASELINE:
        _BASELINE[key] = measure_baseline(key)
    return _BASELINE[key]


class UNet(StreamedModel):
    def __call__(self, sample: np.ndarray, timestep, encoder_hidden_states: np.ndarray,
                 text_embeds: np.ndarray | None = None, time_ids: np.ndarray | None = None) -> np.ndarray:
        """The predicted noise (or v). ``text_embeds``/``time_ids``: SDXL's ``added_cond_kwargs``
        (pooled text [B, 1280] and the six size/crop ids [B, 6]), which a ``text_time`` UNet needs."""
        from .models.unet import build_unet

        sample = np.asarray(sample, np.float32)
        ctx = np.asarray(encoder_hidden_states, np.float32)
        b, _, h, w = sample.shape
        t = np.broadcast_to(np.asarray(timestep, np.float32).reshape(-1), (b,)).copy()
        key = (b, h, w, ctx.shape[1])
        build = lambda: build_unet(self.config, self.weight_info, batch=b, height=h, width=w,  # noqa: E731
                                   seq_len=ctx.shape[1], where=str(self.checkpoint.root))
        feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ctx}
        if self.config.get("addition_embed_type") == "text_time":
            if text_embeds is None or time_ids is None:
                raise StreamexecError("this UNet (SDXL, addition_embed_type text_time) needs text_embeds and time_ids")
            feeds["text_embeds"] = np.asarray(text_embeds, np.float32)
            feeds["time_ids"] = np.asarray(time_ids, np.float32)
        return self._run(key, build, feeds)[0]


class CLIPText(StreamedModel):
    def __call__(self, input_ids: np.ndarray, penultimate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(last hidden state — ``penultimate``: ``hidden_states[-2]`` as SDXL takes it — , pooled
        output, projected when the component has ``text_projection``)."""
        from .models.clip import build_clip_text

        ids = np.asarray(input_ids, np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, n = ids.shape
        build = lambda: build_clip_text(self.config, self.weight_info, batch=b, seq_len=n,  # noqa: E731
                                        where=str(self.checkpoint.root), penultimate=penultimate)
        h, pooled = self._run((b, n, penultimate), build, {"input_ids": ids})
        return h, pooled


class VAE(StreamedModel):
    @property
    def scaling_factor(self) -> float:
        return vae_scaling_factor(self.config)

    @property
    def shift_factor(self) -> float | None:
        return vae_shift_factor(self.config)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """``AutoencoderKL.decode(z).sample`` (the caller applies scaling/shift as pipelines do)."""
        from .models.vae import build_vae_decoder

        z = np.asarray(z, np.float32)
        b, _, h, w = z.shape
        build = lambda: build_vae_decoder(self.config, self.weight_info, batch=b, height=h, width=w,  # noqa: E731
                                          where=str(self.checkpoint.root))
        return self._run(("dec", b, h, w), build, {"z": z})[0]

    def encode(self, x: np.ndarray) -> np.ndarray:
        """The mean of ``AutoencoderKL.encode(x).latent_dist`` (its ``.mode()``)."""
        return np.ascontiguousarray(np.split(self.encode_moments(x), 2, axis=1)[0])

    def encode_moments(self, x: np.ndarray) -> np.ndarray:
        """Mean and log-variance stacked on channels (``latent_dist.parameters``)."""
        from .models.vae import build_vae_encoder

        x = np.asarray(x, np.float32)
        b, _, h, w = x.shape
        build = lambda: build_vae_encoder(self.config, self.weight_info, batch=b, height=h, width=w,  # noqa: E731
                                          where=str(self.checkpoint.root))
        return self._run(("enc", b, h, w), build, {"x": x})[0]


class TinyVAE(StreamedModel):
    """The decoder of diffusers' ``AutoencoderTiny`` (TAESD, TAESDXL, TAEF1): ``component="taesd"``."""

    def decode(self, z: np.ndarray) -> np.ndarray:
        """``AutoencoderTiny.decode(z).sample`` in [-1, 1]; ``z`` as a diffusers pipeline passes it
        (``latents_from_model(x)`` does that scaling)."""
        from .models.taesd import build_tiny_decoder

        z = np.asarray(z, np.float32)
        if z.ndim != 4:
            raise StreamexecError(f"z must be [B, C, h, w], got shape {list(z.shape)}")
        b, _, h, w = z.shape
        build = lambda: build_tiny_decoder(self.config, self.weight_info, batch=b, height=h, width=w,  # noqa: E731
                                           where=str(self.checkpoint.root))
        return self._run(("dec", b, h, w), build, {"z": z})[0]

    def latents_from_model(self, x: np.ndarray) -> np.ndarray:
        """The denoiser's (unpacked) latents as diffusers pipelines hand them to ``decode``:
        ``x / scaling_factor + shift_factor`` with this decoder's config (1.0 and 0 when it has none)."""
        scale, shift = tiny_vae_scaling(self.config)
        return np.asarray(x, np.float32) / np.float32(scale) + np.float32(shift)


def _ids_2d(ids: np.ndarray, name: str) -> np.ndarray:
    """Position ids as [N, 3]; a 3-D [B, N, 3] is taken at batch 0, as diffusers does."""
    a = np.asarray(ids, np.float32)
    if a.ndim == 3:
        a = a[0]
    if a.ndim != 2:
        raise StreamexecError(f"{name} must be [N, n_axes] (or [B, N, n_axes]), got shape {list(a.shape)}")
    return np.ascontiguousarray(a)


class FluxTransformer(StreamedModel):
    """FLUX.1 ``FluxTransformer2DModel`` (schnell: no guidance; dev: ``guidance`` required)."""

    def __call__(self, hidden_states: np.ndarray, encoder_hidden_states: np.ndarray, pooled_projections: np.ndarray,
                 timestep, img_ids: np.ndarray, txt_ids: np.ndarray, guidance=None) -> np.ndarray:
        """``FluxTransformer2DModel(...).sample``: [B, img_tokens, p²·out_channels].

        ``timestep`` (and ``guidance``) as the pipeline passes them: t in [0, 1] (the model
        multiplies by 1000), scalar or [B]; ``img_ids`` / ``txt_ids`` [N, 3].
        """
        from .models.flux import build_flux_transformer

        x = np.asarray(hidden_states, np.float32)
        ctx = np.asarray(encoder_hidden_states, np.float32)
        pooled = np.asarray(pooled_projections, np.float32)
        if x.ndim != 3 or ctx.ndim != 3 or pooled.ndim != 2:
            raise StreamexecError("hidden_states and encoder_hidden_states must be [B, N, C], "
                                  "pooled_projections [B, D]")
        b, ni = x.shape[:2]
        nt = ctx.shape[1]
        feeds = {
            "hidden_states": x, "encoder_hidden_states": ctx, "pooled_projections": pooled,
            "timestep": np.broadcast_to(np.asarray(timestep, np.float32).reshape(-1), (b,)).copy(),
            "img_ids": _ids_2d(img_ids, "img_ids"), "txt_ids": _ids_2d(txt_ids, "txt_ids"),
        }
        if guidance is not None:
            feeds["guidance"] = np.broadcast_to(np.asarray(guidance, np.float32).reshape(-1), (b,)).copy()
        build = lambda: build_flux_transformer(self.config, self.weight_info, batch=b, img_tokens=ni,  # noqa: E731
                                               txt_tokens=nt, where=str(self.checkpoint.root))
        if self.has_guidance != (guidance is not None):
            raise StreamexecError(
                "this FLUX transformer has a guidance embedder (dev): pass guidance (e.g. 3.5)" if guidance is None
                else "this FLUX transformer has no guidance embedder (schnell): pass guidance=None")
        return self._run((b, ni, nt), build, feeds)[0]

    @property
    def has_guidance(self) -> bool:
        """True for guidance-distilled models (FLUX.1-dev): ``guidance_embeds`` or, in a single
        file without config, a guidance embedder among the weights."""
        return is_flux_dev(self.config, self.weight_info)


class T5Encoder(StreamedModel):
    """transformers ``T5EncoderModel`` (FLUX's ``text_encoder_2``)."""

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """``last_hidden_state`` [B, N, d_model]. ``attention_mask`` (optional; the FLUX pipeline
        passes none) must be right padding: ones, then zeros."""
        from .models.t5 import build_t5_encoder

        ids = np.asarray(input_ids, np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, n = ids.shape
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        masked = False
        if attention_mask is not None:
            m = np.asarray(attention_mask).reshape(b, n) != 0
            key_len = m.sum(axis=1)
            if not np.array_equal(m, np.arange(n)[None, :] < key_len[:, None]) or (key_len == 0).any():
                raise StreamexecError("attention_mask must be right padding (1…1 0…0) with at least one 1 per row")
            masked = bool((key_len < n).any())
            if masked:
                feeds["key_len"] = key_len.astype(np.int64)
        build = lambda: build_t5_encoder(self.config, self.weight_info, batch=b, seq_len=n,  # noqa: E731
                                         masked=masked, where=str(self.checkpoint.root))
        return self._run((b, n, masked), build, feeds)[0]


MODEL_CLASSES: dict[str, type[StreamedModel]] = {
    "unet": UNet, "text_encoder": CLIPText, "vae": VAE, "transformer": FluxTransformer, "text_encoder_2": T5Encoder,
    "taesd": TinyVAE,
}


def model_class(comp: Component) -> type[StreamedModel] | None:
    """The class that runs a component: by name, except that ``text_encoder_2`` is CLIP (SDXL's
    OpenCLIP bigG) rather than T5 (FLUX) when its weights have CLIP's names."""
    if comp.name == "text_encoder_2" and is_clip(comp.tensors):
        return CLIPText
    return MODEL_CLASSES.get(comp.name)


def load(path: str | Path | None = None, component: str | None = None, memory_budget: str | int | None = None,
         variant: str | None = None, *, baseline: int | None = None, scratch_dir: str | None = None,
         strict: bool = False, diffusion_model: str | Path | None = None, vae: str | Path | None = None,
         clip_l: str | Path | None = None, t5xxl: str | Path | None = None,
         loras: list[tuple[str | Path, float]] | None = None) -> StreamedModel:
    """Open ``path`` (file, component folder or pipeline folder) and return one component, ready
    to run within ``memory_budget`` (e.g. "400M": peak RSS of the whole process; None = no bound,
    the fastest schedule; "min" = the fastest schedule within the smallest budget that fits;
    "smallest" = every op at its smallest option, which exercises every out-of-core path; "auto" = the
    cgroup limit or available RAM minus a margin, as ``--memory-budget auto``).

    ``baseline``: bytes of the process that are not the model's (default: measured — this
    process's RSS with the kernels loaded). Pass 0 to give the model ``memory_budget`` for its
    own weights, activations and scratch, e.g. when embedding streamexec in a larger program.
    ``scratch_dir``: where activations that do not fit are spilled (default: the temp folder).
    ``strict``: if the process goes over a byte budget anyway (a planner mistake), raise
    ``BudgetExceeded`` naming the op instead of adapting the rest of the run (the default).
    ``diffusion_model``, ``vae``, ``clip_l``, ``t5xxl``: separate files, one per role, as the CLI
    flags (``path`` may then be None), e.g. ``load(component="vae", vae="ae.safetensors")``.

    ``loras``: LoRA files to apply, ``[(path, weight), ...]`` (kohya/A1111 or diffusers/PEFT keys;
    merged on the fly, the base weights are never copied)."""
    budget = parse_budget(memory_budget)
    ckpt = assemble(path, {"diffusion_model": diffusion_model, "vae": vae, "clip_l": clip_l, "t5xxl": t5xxl},
                    variant=variant)
    comp = ckpt.component(component)
    cls = model_class(comp)
    if cls is None:
        raise StreamexecError(f"component {comp.name!r} cannot be run yet (supported: {', '.join(MODEL_CLASSES)})")
    return cls(ckpt, comp, budget, baseline, scratch_dir, strict=strict, loras=loras)
