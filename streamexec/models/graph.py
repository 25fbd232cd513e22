"""The op graph every model builder emits: a straight-line list of ops over named f32 tensors,
with weights named by internal checkpoint key. It is data — the planner annotates it, plan.yaml
serialises it, the executor interprets it; nothing in it is code.

Op kinds and their meaning (shapes: B batch, N tokens, C/D features, H×W image):

===================  ===========================================================================
kind                 semantics (inputs → output; weights; attrs)
===================  ===========================================================================
linear               x[..., K] → x @ W.T + b; weight [N, K], bias; attrs: activation
                     (None|silu|gelu|gelu_tanh|quick_gelu), gate (None|geglu|gated_gelu: second
                     weight ``weight2`` or halves of one), optional 2nd input = residual added;
                     attrs transposed: weight stored [K, N], x @ W (a small one; no bias)
conv2d               x[B, C, H, W] → [B, Co, Ho, Wo]; weight [Co, C, k, k], bias; attrs stride,
                     pad (top, bottom, left, right), upsample (nearest 2× fused); opt. residual
group_norm           x[B, C, H, W]; weight, bias; attrs groups, eps, silu
layer_norm           x[..., D]; weight?, bias?; attrs eps; optional inputs shift, scale [B, D]
                     (AdaLN: norm(x) * (1 + scale) + shift, broadcast over tokens)
rms_norm             x[..., D] (D = last axis, e.g. per head); weight; attrs eps
attention            q[B, Nq, H*D], k, v [B, Nk, H*D] → [B, Nq, H*D]; attrs heads, scale, causal;
                     optional 4th input rel_bias [H, Nq+Nk-1] when attrs rel_bias (T5); FLUX's
                     RoPE is applied to q and k before, by head_norm
add                  a + b; b may broadcast: [B, C] over [B, C, H, W] (attrs broadcast="nchw")
                     or [B, D] over [B, N, D] (broadcast="tokens"); attrs scale_b (gate input)
gated_add            inputs a, b [B, N, D], gate [B, D] → a + gate * b (FLUX residual with AdaLN gate;
                     the product is rounded first, as diffusers)
mul                  a * b elementwise (T5 gated FF when not fused)
unary                x → f(x); attrs fn (silu|gelu|gelu_tanh|quick_gelu|relu|soft_clamp:
                     tanh(x / bound) · bound, attrs bound)
concat               inputs concatenated on attrs axis
slice                x[..., start:stop]; attrs axis, start, stop (a view: chunks of AdaLN projections,
                     the text / image rows of a joint stream)
to_tokens            [B, C, H, W] → [B, H*W, C]
to_image             [B, H*W, C] → [B, C, H, W]; attrs height, width
timestep_embedding   t[B] → [B, dim], or t[B, T] → [B, T*dim] (each value's embedding side by side:
                     SDXL's time ids); attrs dim, flip_sin_to_cos, shift, scale
embedding            ids[B, N] (int) → weight rows [B, N, D]
add_position         x[B, N, D] + weight[:N] (learned positions, CLIP)
pool_eos             x[B, N, D], ids[B, N] → [B, D]: the row at the EOS token (CLIP pooled output)
scale                x * attrs.factor (+ attrs.offset, if given)
rope_freqs           txt_ids [Nt, A], img_ids [Ni, A] → [2, Nt+Ni, D/2]: cos and sin of the FLUX
                     RoPE over ids [txt; img]; attrs axes_dim (sum D), theta
head_norm            x[B, N, H*D] → RMSNorm over each head's D features (weight [D]; attrs heads,
                     eps), then, with a 2nd input rope [2, Nr, D/2], RoPE with table rows
                     attrs.rope_offset + (0..N-1) (FLUX q/k norm + rotary embedding)
mlp                  x[B, N, K] → act(x @ up.T + up_bias) [* (x @ up_mul.T)] @ down.T + down_bias;
                     weights up, up_bias?, up_mul? (T5 gated FF), down, down_bias?; attrs
                     activation (+ relu); optional inputs residual [B, N, D], gate [B, D] →
                     residual + gate * mlp(x). The [rows, inner] hidden exists row_chunk rows at
                     a time (params row_chunk, panel_rows)
parallel_mlp         inputs x [B, N, K], attn [B, N, A], residual [B, N, D], gate [B, D] →
                     residual + gate * (concat(attn, act(x @ up.T + up_bias)) @ down.T +
                     down_bias) (FLUX single block: proj_mlp, proj_out); row-chunked like mlp
t5_rel_bias          no inputs; weight [buckets, H] → [H, Nq+Nk-1]: T5's bucketed bias of relative
                     offset j - i at index j - i + Nq - 1; attrs nq, nk, num_buckets,
                     max_distance, bidirectional (the layout ``attention`` takes as rel_bias)
prefix_attention     as attention (no causal), inputs q, k, v, key_len [B] (int), rel_bias?: item b
                     attends to its first key_len[b] keys only (right-padded attention_mask)
===================  ===========================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import CheckpointError

Shape = tuple[int, ...]


@dataclass
class Op:
    """One operation: reads ``inputs`` (tensor names), writes ``output``, uses ``weights``."""

    name: str
    kind: str
    inputs: list[str]
    output: str
    weights: dict[str, str] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    unit: str = ""


@dataclass
class Graph:
    """A model's computation for fixed input shapes."""

    model: str
    config: dict
    inputs: dict[str, Shape] = field(default_factory=dict)
    input_dtypes: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, Shape] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def shape(self, name: str) -> Shape:
        return self.tensors[name]


WeightInfo = Callable[[str], "tuple[Shape, str] | None"]


class GraphBuilder:
    """Helps a model builder emit ops: unique tensor names, unit scoping, weight checks."""

    def __init__(self, model: str, config: dict, weight_info: WeightInfo, where: str = "checkpoint") -> None:
        self.graph = Graph(model, config)
        self._info = weight_info
        self._where = where
        self._unit = ""
        self._n = 0

    # -- weights ----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return self._info(key) is not None

    def wshape(self, key: str) -> Shape:
        info = self._info(key)
        if info is None:
            raise CheckpointError(self._where, f"missing tensor {key!r} needed by {self.graph.model}")
        return tuple(info[0])

    def expect(self, key: str, shape: Shape) -> str:
        """Check a weight exists with exactly this shape; returns the key."""
        got = self.wshape(key)
        if got != tuple(shape):
            raise CheckpointError(
                self._where, f"tensor {key!r} has shape {list(got)}, {self.graph.model} expects {list(shape)}"
            )
        return key

    # -- tensors and ops --------------------------------------------------------------------
    def input(self, name: str, shape: Shape, dtype: str = "f32") -> str:
        self.graph.inputs[name] = tuple(shape)
        self.graph.input_dtypes[name] = dtype
        self.graph.tensors[name] = tuple(shape)
        return name

    @contextlib.contextmanager
    def unit(self, name: str) -> Iterator[None]:
        """Ops emitted inside belong to streaming unit ``name`` (the planner may split it)."""
        prev = self._unit
        self._unit = name
        try:
            yield
        finally:
            self._unit = prev

    def op(
        self,
        kind: str,
        inputs: list[str],
        shape: Shape,
        *,
        name: str,
        weights: dict[str, str] | None = None,
        attrs: dict | None = None,
    ) -> str:
        for t in inputs:
            if t not in self.graph.tensors:
                raise ValueError(f"op {name}: unknown input tensor {t!r}")
        self._n += 1
        out = f"{name}:{self._n}"
        self.graph.tensors[out] = tuple(int(s) for s in shape)
        self.graph.ops.append(
            Op(name, kind, list(inputs), out, dict(weights or {}), dict(attrs or {}), self._unit or name)
        )
        return out

    def output(self, *names: str) -> None:
        self.graph.outputs.extend(names)

    def shape(self, t: str) -> Shape:
        return self.graph.tensors[t]

    # -- common ops with shape inference and weight checks ------------------------------------
    def linear(
        self, x: str, prefix: str, *, activation: str | None = None, residual: str | None = None,
        bias: bool | None = None, name: str | None = None,
    ) -> str:
        wkey = f"{prefix}.weight"
        n_out, k = self.wshape(wkey)[:2] if len(self.wshape(wkey)) == 2 else (None, None)
        if n_out is None:
            raise CheckpointError(self._where, f"tensor {wkey!r} should be 2-D, has shape {list(self.wshape(wkey))}")
        xs = self.shape(x)
        if xs[-1] != k:
            raise CheckpointError(
                self._where, f"tensor {wkey!r} has shape {[n_out, k]} but its input has {xs[-1]} features"
            )
        weights = {"weight": wkey}
        bkey = f"{prefix}.bias"
        if bias is None:
            bias = self.has(bkey)
        if bias:
            weights["bias"] = self.expect(bkey, (n_out,))
        inputs = [x] + ([residual] if residual else [])
        return self.op(
            "linear", inputs, xs[:-1] + (n_out,), name=name or prefix, weights=weights,
            attrs={"activation": activation} if activation else {},
        )

    def conv2d(
        self, x: str, prefix: str, *, stride: int = 1, pad: tuple[int, int, int, int] | None = None,
        upsample: bool = False, residual: str | None = None, name: str | None = None,
    ) -> str:
        wkey = f"{prefix}.weight"
        ws = self.wshape(wkey)
        b, c, h, w = self.shape(x)
        if len(ws) != 4 or ws[1] != c or ws[2] != ws[3]:
            raise CheckpointError(
                self._where, f"tensor {wkey!r} has shape {list(ws)}, expected [out, {c}, k, k]"
            )
        k = ws[2]
        if pad is None:
            p = k // 2
            pad = (p, p, p, p)
        if upsample:
            h, w = 2 * h, 2 * w
        ho = (h + pad[0] + pad[1] - k) // stride + 1
        wo = (w + pad[2] + pad[3] - k) // stride + 1
        weights = {"weight": wkey}
        if self.has(f"{prefix}.bias"):
            weights["bias"] = self.expect(f"{prefix}.bias", (ws[0],))
        inputs = [x] + ([residual] if residual else [])
        return self.op(
            "conv2d", inputs, (b, ws[0], ho, wo), name=name or prefix, weights=weights,
            attrs={"stride": stride, "pad": list(pad), "upsample": upsample, "kernel": k},
        )

    def group_norm(self, x: str, prefix: str, groups: int, eps: float, *, silu: bool = False) -> str:
        c = self.shape(x)[1]
        weights = {"weight": self.expect(f"{prefix}.weight", (c,)), "bias": self.expect(f"{prefix}.bias", (c,))}
        return self.op(
            "group_norm", [x], self.shape(x), name=prefix, weights=weights,
            attrs={"groups": groups, "eps": eps, "silu": silu},
        )

    def layer_norm(
        self, x: str, prefix: str | None, eps: float, *, shift: str | None = None, scale: str | None = None,
        name: str | None = None,
    ) -> str:
        d = self.shape(x)[-1]
        weights = {}
        if prefix is not None:
            weights["weight"] = self.expect(f"{prefix}.weight", (d,))
            if self.has(f"{prefix}.bias"):
                weights["bias"] = self.expect(f"{prefix}.bias", (d,))
        inputs = [x] + ([shift, scale] if shift is not None else [])
        return self.op(
            "layer_norm", inputs, self.shape(x), name=name or prefix or "layer_norm", weights=weights,
            attrs={"eps": eps, "modulated": shift is not None},
        )

    def attention_block(
        self, x: str, kv: str, prefix: str, *, heads: int, scale: float, causal: bool = False,
        residual: str | None = None, names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out.0"),
    ) -> str:
        """q from ``x``, k/v from ``kv`` (``kv is x`` for self-attention), attention, output
        projection (+ residual) — the block shared by UNet, CLIP and VAE attention."""
        q_name, k_name, v_name, out_name = names
        q = self.linear(x, f"{prefix}.{q_name}")
        k = self.linear(kv, f"{prefix}.{k_name}")
        v = self.linear(kv, f"{prefix}.{v_name}")
        a = self.op("attention", [q, k, v], self.shape(q), name=prefix,
                    attrs={"heads": heads, "scale": scale, "causal": causal})
        return self.linear(a, f"{prefix}.{out_name}", residual=residual)

    def add(self, a: str, b: str, *, name: str, broadcast: str | None = None) -> str:
        return self.op("add", [a, b], self.shape(a), name=name, attrs={"broadcast": broadcast} if broadcast else {})

    def unary(self, x: str, fn: str, *, name: str) -> str:
        return self.op("unary", [x], self.shape(x), name=name, attrs={"fn": fn})
