"""The public Python API: ``streamexec.load(path, component=..., memory_budget=...)``.

Argument names and outputs follow diffusers/transformers, numpy in and numpy out::

    eps = streamexec.load(p, component="unet")(sample=x, timestep=t, encoder_hidden_states=c)
    h, pooled = streamexec.load(p, component="text_encoder")(input_ids=ids)
    img = streamexec.load(p, component="vae").decode(z)           # and .encode(x)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import StreamexecError
from .models.graph import Graph
from .runtime.executor import Executor, Schedule
from .sizes import parse_size
from .weights.checkpoint import Checkpoint, Component, open_checkpoint
from .weights.store import WeightStore


class StreamedModel:
    """A component of a checkpoint, run layer by layer. Graphs are built per input shape."""

    def __init__(self, ckpt: Checkpoint, comp: Component, memory_budget: int | None) -> None:
        self.checkpoint = ckpt
        self.component = comp
        self.config = dict(comp.config or {})
        self.memory_budget = memory_budget
        self.store: WeightStore = ckpt.store(comp.name)
        self._graphs: dict[tuple, tuple[Graph, Schedule]] = {}
        self.last_executor: Executor | None = None

    def weight_info(self, key: str):
        t = self.store.tensors.get(key)
        return None if t is None else (t.shape, t.dtype)

    def _run(self, key: tuple, build, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if key not in self._graphs:
            graph = build()
            self._graphs[key] = (graph, self._schedule(graph))
        graph, schedule = self._graphs[key]
        ex = Executor(graph, self.store, schedule)
        self.last_executor = ex
        return ex.run(feeds)

    def _schedule(self, graph: Graph) -> Schedule:
        from .planner.fit import fit_schedule

        return fit_schedule(graph, self.store, self.memory_budget)

    def close(self) -> None:
        self.store.close()
        self.checkpoint.close()


class UNet(StreamedModel):
    def __call__(self, sample: np.ndarray, timestep, encoder_hidden_states: np.ndarray) -> np.ndarray:
        from .models.unet import build_unet

        sample = np.asarray(sample, np.float32)
        ctx = np.asarray(encoder_hidden_states, np.float32)
        b, _, h, w = sample.shape
        t = np.broadcast_to(np.asarray(timestep, np.float32).reshape(-1), (b,)).copy()
        key = (b, h, w, ctx.shape[1])
        build = lambda: build_unet(self.config, self.weight_info, batch=b, height=h, width=w,  # noqa: E731
                                   seq_len=ctx.shape[1], where=str(self.checkpoint.root))
        return self._run(key, build, {"sample": sample, "timestep": t, "encoder_hidden_states": ctx})[0]


class CLIPText(StreamedModel):
    def __call__(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from .models.clip import build_clip_text

        ids = np.asarray(input_ids, np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, n = ids.shape
        build = lambda: build_clip_text(self.config, self.weight_info, batch=b, seq_len=n,  # noqa: E731
                                        where=str(self.checkpoint.root))
        h, pooled = self._run((b, n), build, {"input_ids": ids})
        return h, pooled


class VAE(StreamedModel):
    @property
    def scaling_factor(self) -> float:
        return float(self.config.get("scaling_factor", 0.18215))

    @property
    def shift_factor(self) -> float | None:
        return self.config.get("shift_factor")

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


MODEL_CLASSES: dict[str, type[StreamedModel]] = {"unet": UNet, "text_encoder": CLIPText, "vae": VAE}


def load(path: str | Path, component: str | None = None, memory_budget: str | int | None = None,
         variant: str | None = None) -> StreamedModel:
    """Open ``path`` (file, component folder or pipeline folder) and return one component, ready
    to run within ``memory_budget`` (e.g. "400M"; None = no bound)."""
    ckpt = open_checkpoint(path, variant=variant)
    comp = ckpt.component(component)
    cls = MODEL_CLASSES.get(comp.name)
    if cls is None:
        raise StreamexecError(f"component {comp.name!r} cannot be run yet (supported: {', '.join(MODEL_CLASSES)})")
    budget = None if memory_budget is None else parse_size(memory_budget)
    return cls(ckpt, comp, budget)
