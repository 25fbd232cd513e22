"""Checkpoint key layouts: the one place where stored key names become internal names.

Inside streamexec every tensor is named as diffusers/transformers name it in its component:
``unet`` (UNet2DConditionModel), ``vae`` (AutoencoderKL), ``transformer``
(FluxTransformer2DModel), ``text_encoder`` (CLIP text model, ``text_model.*`` names as the
published checkpoints have them), ``text_encoder_2`` (T5 encoder; SDXL: OpenCLIP bigG with CLIP
names) and ``taesd`` (the decoder of an AutoencoderTiny: TAESD, TAESDXL, TAEF1). The files people
actually have use other names (SD 1.5 LDM/CompVis and SDXL SGM single files, BFL FLUX files,
ComfyUI text encoders);
this module recognises them from key names and shapes alone and says, for every internal name,
which stored bytes hold it (:class:`~streamexec.weights.refs.MappedTensor`).

Everything is decided from names and shapes: no file is opened and no tensor data is read. Block
counts, layers per block and widths are inferred from the keys present, never assumed. Splits of
fused tensors (BFL's ``qkv`` and ``linear1``, OpenCLIP's ``in_proj``) are row ranges and 1x1 convolutions seen as linear
weights are reshapes, so every big tensor stays a zero-copy view; the only concatenation is BFL's
``final_layer.adaLN_modulation`` whose (shift, scale) halves diffusers stores as (scale, shift).
The one internal name diffusers lacks is ``text_projection.weight.T`` (OpenCLIP's projection as
stored, the transpose of diffusers' ``text_projection.weight``), so it too stays a view.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import LayoutError
from .refs import MappedTensor, StoredTensor, TensorRef, single
from .scaled import attach_scales, split_scales

#: The component names (the diffusers pipeline folder names), in pipeline order: the ones a layout
#: can produce, a pipeline folder is searched for, and a run can execute (``models.registry`` and
#: everything above use this tuple).
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "transformer", "vae", "taesd")


@dataclass
class LayoutResult:
    """What a checkpoint holds: its layout name, each component's internally named tensors, and
    the stored keys deliberately left unused (EMA copies, schedule buffers, ``position_ids``...)."""

    layout: str
    components: dict[str, dict[str, MappedTensor]]
    ignored: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# MappedTensor constructors (all views except _swap_halves)


def _view(
    st: StoredTensor, shape: tuple[int, ...], rows: tuple[int, int] | None = None
) -> MappedTensor:
    """One stored tensor (or a row range of it) seen with another shape of the same size."""
    ref = TensorRef(st.path, st.key, st.dtype, shape, rows)
    return MappedTensor((ref,), shape, st.dtype)


def _rows(st: StoredTensor, start: int, stop: int) -> MappedTensor:
    """Rows [start, stop) of dim 0: contiguous in a C-ordered tensor, hence a view."""
    if start == 0 and stop == st.shape[0]:
        return single(st)
    return _view(st, (stop - start, *st.shape[1:]), (start, stop))


def _linear_view(st: StoredTensor, path: str) -> MappedTensor:
    """A 1x1 convolution weight ``[out, in, 1, 1]`` (or ``[out, in, 1]``) seen as ``[out, in]``."""
    shape = st.shape
    if len(shape) == 2:
        return single(st)
    if len(shape) in (3, 4) and all(s == 1 for s in shape[2:]):
        return _view(st, shape[:2])
    raise LayoutError(
        path, f"{st.key} has shape {list(shape)}; expected a linear or 1x1 conv weight"
    )


def _swap_halves(st: StoredTensor, path: str) -> MappedTensor:
    """The two halves of dim 0 in the other order (BFL shift,scale -> diffusers scale,shift)."""
    n = st.shape[0]
    if n % 2:
        raise LayoutError(path, f"{st.key} has {n} rows; expected an even number (shift, scale)")
    h = n // 2
    rest = st.shape[1:]
    hi = TensorRef(st.path, st.key, st.dtype, (h, *rest), (h, n))
    lo = TensorRef(st.path, st.key, st.dtype, (h, *rest), (0, h))
    return MappedTensor((hi, lo), st.shape, st.dtype)


def _split_rows(st: StoredTensor, sizes: tuple[int, ...], path: str) -> list[MappedTensor]:
    """Consecutive row ranges of the given sizes; they must cover dim 0 exactly."""
    if sum(sizes) != st.shape[0] or min(sizes) <= 0:
        raise LayoutError(
            path,
            f"{st.key} has {st.shape[0]} rows; cannot split it into {'+'.join(map(str, sizes))}",
        )
    out, start = [], 0
    for n in sizes:
        out.append(_rows(st, start, start + n))
        start += n
    return out


# --------------------------------------------------------------------------------------------
# One component being mapped


class _Out:
    """Collects one component's mapping plus the stored keys it ignored or did not understand."""

    def __init__(self, component: str, path: str) -> None:
        self.component = component
        self.path = path
        self.tensors: dict[str, MappedTensor] = {}
        self.ignored: list[str] = []
        self.unknown: list[str] = []

    def put(self, name: str, mt: MappedTensor) -> None:
        if name in self.tensors:
            raise LayoutError(
                self.path,
                f"two stored tensors map to {self.component} {name!r} "
                f"({self.tensors[name].parts[0].key!r} and {mt.parts[0].key!r})",
            )
        self.tensors[name] = mt

    def same(self, name: str, st: StoredTensor) -> None:
        self.put(name, single(st))


Section = Mapping[str, StoredTensor]  # key with the section's wrapper prefix removed -> tensor
Converter = Callable[[Section, _Out], None]


def _param(rest: str) -> tuple[str, str]:
    """``'a.b.weight'`` -> ``('a.b', 'weight')``."""
    head, _, leaf = rest.rpartition(".")
    return head, leaf


# --------------------------------------------------------------------------------------------
# LDM / CompVis UNet (``model.diffusion_model.*``)

_LDM_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_LDM_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL's text_time added conditioning
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_UNET_BLOCK_RE = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_UNET_MID_RE = re.compile(r"middle_block\.(\d+)\.(.+)")


def _ldm_resnet(out: _Out, rest: str, st: StoredTensor, new_prefix: str) -> None:
    head, leaf = _param(rest)
    name = _LDM_RESNET.get(head)
    if name is None or leaf not in ("weight", "bias"):
        out.unknown.append(st.key)
    else:
        out.same(f"{new_prefix}.{name}.{leaf}", st)


def _is_ldm_resnet(items: list[tuple[str, StoredTensor]]) -> bool:
    return any(rest.startswith(("in_layers.", "out_layers.", "emb_layers.")) for rest, _ in items)


def _grouped(
    section: Section, out: _Out
) -> tuple[dict[str, dict[int, dict[int, list[tuple[str, StoredTensor]]]]], dict[int, list]]:
    """Sort UNet keys into {input_blocks|output_blocks: {block: {sub: [(rest, st)]}}} and
    {middle sub-block: [(rest, st)]}; top-level keys are mapped directly."""
    blocks: dict[str, dict[int, dict[int, list[tuple[str, StoredTensor]]]]] = {
        "input_blocks": {},
        "output_blocks": {},
    }
    middle: dict[int, list[tuple[str, StoredTensor]]] = {}
    for key, st in section.items():
        head, leaf = _param(key)
        if head in _LDM_UNET_TOP and leaf in ("weight", "bias"):
            out.same(f"{_LDM_UNET_TOP[head]}.{leaf}", st)
            continue
        m = _UNET_BLOCK_RE.fullmatch(key)
        if m:
            kind, b, s, rest = m[1], int(m[2]), int(m[3]), m[4]
            if not (kind == "input_blocks" and b == 0):
                blocks[kind].setdefault(b, {}).setdefault(s, []).append((rest, st))
                continue
        m = _UNET_MID_RE.fullmatch(key)
        if m:
            middle.setdefault(int(m[1]), []).append((m[2], st))
            continue
        out.unknown.append(st.key)
    return blocks, middle


def _check_contiguous(indices: list[int], first: int, what: str, path: str) -> None:
    if indices and indices != list(range(first, first + len(indices))):
        raise LayoutError(path, f"{what} block numbers are not contiguous: {indices}")


def _convert_ldm_unet(section: Section, out: _Out) -> None:
    """LDM UNet -> diffusers UNet2DConditionModel names; levels and layers from the keys."""
    blocks, middle = _grouped(section, out)

    # Down path: each input block is a resnet (+ attention) layer, or a downsampler ("op")
    # that closes its level.
    inputs = blocks["input_blocks"]
    _check_contiguous(sorted(inputs), 1, "input_blocks", out.path)
    level = layer = 0
    for b in sorted(inputs):
        subs = inputs[b]
        if any(rest.startswith("op.") for rest, _ in subs.get(0, [])):
            for s, items in subs.items():
                for rest, st in items:
                    if s == 0 and rest in ("op.weight", "op.bias"):
                        out.same(f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}", st)
                    else:
                        out.unknown.append(st.key)
            level, layer = level + 1, 0
            continue
        for s, items in subs.items():
            for rest, st in items:
                if s == 0:
                    _ldm_resnet(out, rest, st, f"down_blocks.{level}.resnets.{layer}")
                elif s == 1:
                    out.same(f"down_blocks.{level}.attentions.{layer}.{rest}", st)
                else:
                    out.unknown.append(st.key)
        layer += 1
    down_levels = level + 1 if inputs else 0

    # Middle: resnets and attentions in stored order.
    counts = {"resnets": 0, "attentions": 0}
    for s in sorted(middle):
        kind = "resnets" if _is_ldm_resnet(middle[s]) else "attentions"
        prefix = f"mid_block.{kind}.{counts[kind]}"
        for rest, st in middle[s]:
            if kind == "resnets":
                _ldm_resnet(out, rest, st, prefix)
            else:
                out.same(f"{prefix}.{rest}", st)
        counts[kind] += 1

    # Up path: an upsampler (a sub-block with a direct "conv.") closes its level.
    outputs = blocks["output_blocks"]
    _check_contiguous(sorted(outputs), 0, "output_blocks", out.path)
    level = layer = 0
    for b in sorted(outputs):
        upsampled = False
        for s, items in sorted(outputs[b].items()):
            for rest, st in items:
                if s == 0:
                    _ldm_resnet(out, rest, st, f"up_blocks.{level}.resnets.{layer}")
                elif rest in ("conv.weight", "conv.bias"):
                    out.same(f"up_blocks.{level}.upsamplers.0.{rest}", st)
                    upsampled = True
                elif s == 1:
                    out.same(f"up_blocks.{level}.attentions.{layer}.{rest}", st)
                else:
                    out.unknown.append(st.key)
        level, layer = (level + 1, 0) if upsampled else (level, layer + 1)
    up_levels = level + (1 if layer else 0)
    if outputs and inputs and up_levels != down_levels:
        raise LayoutError(
            out.path,
            f"LDM UNet has {down_levels} down levels but {up_levels} up levels "
            "(counted from downsample 'op' and upsample 'conv' keys)",
        )


# --------------------------------------------------------------------------------------------
# LDM VAE (``first_stage_model.*``, ComfyUI ``vae.*``, BFL ``ae.safetensors`` without prefix)

_VAE_RESNET = {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_RE = [
    ("top", re.compile(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)")),
    ("quant", re.compile(r"(quant_conv|post_quant_conv)\.(weight|bias)")),
    ("down", re.compile(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)")),
    ("downsample", re.compile(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)")),
    ("up", re.compile(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)")),
    ("upsample", re.compile(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)")),
    ("midres", re.compile(r"(encoder|decoder)\.mid\.block_(\d+)\.(\w+)\.(weight|bias)")),
    ("midattn", re.compile(r"(encoder|decoder)\.mid\.attn_(\d+)\.(\w+)\.(weight|bias)")),
]
_UP_LEVEL_RE = re.compile(r"decoder\.up\.(\d+)\.")


def _vae_resnet(out: _Out, prefix: str, name: str, leaf: str, st: StoredTensor) -> None:
    if name not in _VAE_RESNET:
        out.unknown.append(st.key)
    else:
        name = "conv_shortcut" if name == "nin_shortcut" else name
        out.same(f"{prefix}.{name}.{leaf}", st)


def _convert_ldm_vae(section: Section, out: _Out) -> None:
    """LDM VAE -> diffusers AutoencoderKL names. ``decoder.up.i`` is stored deepest-last, diffusers
    numbers ``decoder.up_blocks`` deepest-first, so level i becomes up_blocks.(n-1-i)."""
    up_levels = [int(m[1]) for k in section if (m := _UP_LEVEL_RE.match(k))]
    n_up = max(up_levels) + 1 if up_levels else 0
    for key, st in section.items():
        if key.startswith("loss."):  # training-time discriminator/LPIPS weights
            out.ignored.append(st.key)
            continue
        kind, m = next(((kind, m) for kind, rx in _VAE_RE if (m := rx.fullmatch(key))), ("", None))
        if m is None:
            out.unknown.append(st.key)
            continue
        if kind == "top":
            name = "conv_norm_out" if m[2] == "norm_out" else m[2]
            out.same(f"{m[1]}.{name}.{m[3]}", st)
        elif kind == "quant":
            out.same(key, st)
        elif kind == "down":
            _vae_resnet(out, f"encoder.down_blocks.{m[1]}.resnets.{m[2]}", m[3], m[4], st)
        elif kind == "downsample":
            out.same(f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}", st)
        elif kind == "up":
            level = n_up - 1 - int(m[1])
            _vae_resnet(out, f"decoder.up_blocks.{level}.resnets.{m[2]}", m[3], m[4], st)
        elif kind == "upsample":
            level = n_up - 1 - int(m[1])
            out.same(f"decoder.up_blocks.{level}.upsamplers.0.conv.{m[2]}", st)
        elif kind == "midres":
            _vae_resnet(out, f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", m[3], m[4], st)
        else:  # midattn
            name = _VAE_ATTN.get(m[3])
            if name is None:
                out.unknown.append(st.key)
                continue
            internal = f"{m[1]}.mid_block.attentions.{int(m[2]) - 1}.{name}.{m[4]}"
            if m[4] == "weight" and name != "group_norm":
                out.put(internal, _linear_view(st, out.path))
            else:
                out.same(internal, st)


# --------------------------------------------------------------------------------------------
# BFL FLUX (``double_blocks.*``; ComfyUI may prefix ``model.diffusion_model.``)

_FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_FLUX_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_FLUX_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_FLUX_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FLUX_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_FLUX_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_FLUX_BLOCK_RE = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")


def _convert_bfl_flux(section: Section, out: _Out) -> None:
    """BFL FLUX -> diffusers FluxTransformer2DModel names. The hidden width is ``img_in``'s output
    size; fused qkv (3 x hidden rows) and single-block linear1 (3 x hidden + mlp rows) are split
    into row ranges."""
    img_in = section.get("img_in.weight")
    if img_in is None or len(img_in.shape) != 2:
        raise LayoutError(
            out.path, "BFL FLUX checkpoint without a 2-D img_in.weight (cannot tell its width)"
        )
    hidden = img_in.shape[0]
    for key, st in section.items():
        head, leaf = _param(key)
        if head in _FLUX_TOP and leaf in ("weight", "bias"):
            out.same(f"{_FLUX_TOP[head]}.{leaf}", st)
            continue
        if head == "final_layer.adaLN_modulation.1" and leaf in ("weight", "bias"):
            out.put(f"norm_out.linear.{leaf}", _swap_halves(st, out.path))
            continue
        m = _FLUX_BLOCK_RE.fullmatch(key)
        if not m:
            out.unknown.append(st.key)
            continue
        double = m[1] == "double_blocks"
        prefix = f"{'transformer_blocks' if double else 'single_transformer_blocks'}.{m[2]}."
        rest = m[3]
        head, leaf = _param(rest)
        plain = _FLUX_DOUBLE if double else _FLUX_SINGLE
        norms = _FLUX_DOUBLE_NORMS if double else _FLUX_SINGLE_NORMS
        if rest in norms:
            out.same(prefix + norms[rest], st)
        elif leaf not in ("weight", "bias"):
            out.unknown.append(st.key)
        elif head in plain:
            out.same(f"{prefix}{plain[head]}.{leaf}", st)
        elif double and head in _FLUX_QKV:
            parts = _split_rows(st, (hidden, hidden, hidden), out.path)
            for name, mt in zip(_FLUX_QKV[head], parts):
                out.put(f"{prefix}{name}.{leaf}", mt)
        elif not double and head == "linear1":
            mlp = st.shape[0] - 3 * hidden
            parts = _split_rows(st, (hidden, hidden, hidden, mlp), out.path)
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            for name, mt in zip(names, parts):
                out.put(f"{prefix}{name}.{leaf}", mt)
        else:
            out.unknown.append(st.key)


# --------------------------------------------------------------------------------------------
# Text encoders (transformers names; ComfyUI clip_l / t5xxl files, LDM cond_stage_model)

_CLIP_KEEP = re.compile(
    r"text_model\.(embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\..+|final_layer_norm\.(weight|bias))"
)
_CLIP_IGNORE = ("text_projection.weight", "logit_scale", "visual_projection.weight")


def _convert_clip(section: Section, out: _Out) -> None:
    """CLIP text model -> ``text_model.*``. Accepts keys with or without ``text_model.`` (newer
    transformers versions save without it) and with a ``transformer.`` wrapper; drops the
    projection heads, the vision tower and the ``position_ids`` buffer."""
    for key, st in section.items():
        k = key.removeprefix("transformer.")
        if k in _CLIP_IGNORE or k.startswith("vision_model.") or k.endswith("position_ids"):
            out.ignored.append(st.key)
            continue
        if not k.startswith("text_model."):
            k = "text_model." + k
        if _CLIP_KEEP.fullmatch(k):
            out.same(k, st)
        else:
            out.unknown.append(st.key)


#: OpenCLIP text tower (SDXL ``conditioner.embedders.1.model.*``) -> CLIP names, per layer and top level.
_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                  "positional_embedding": "text_model.embeddings.position_embedding.weight",
                  "ln_final.weight": "text_model.final_layer_norm.weight",
                  "ln_final.bias": "text_model.final_layer_norm.bias",
                  # stored [width, projection]: x @ W, the transpose of diffusers' text_projection.weight
                  "text_projection": "text_projection.weight.T"}
_OPEN_CLIP_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)")


def _convert_open_clip(section: Section, out: _Out) -> None:
    """OpenCLIP text tower -> CLIPTextModelWithProjection names: the fused attention ``in_proj``
    is split into q/k/v as row views; the projection keeps its stored [width, proj] orientation
    (``text_projection.weight.T``, which the CLIP graph multiplies from the right)."""
    for key, st in section.items():
        if key in _OPEN_CLIP_TOP:
            out.same(_OPEN_CLIP_TOP[key], st)
            continue
        if key in ("logit_scale", "attn_mask"):
            out.ignored.append(st.key)
            continue
        m = _OPEN_CLIP_RE.fullmatch(key)
        if m is None:
            out.unknown.append(st.key)
            continue
        prefix = f"text_model.encoder.layers.{m[1]}"
        if m[2] == "attn" and m[3] in ("in_proj_weight", "in_proj_bias"):
            width = st.shape[0] // 3
            parts = _split_rows(st, (width, width, width), out.path)
            for name, mt in zip(("q_proj", "k_proj", "v_proj"), parts):
                out.put(f"{prefix}.self_attn.{name}.{m[3].removeprefix('in_proj_')}", mt)
        elif m[2] in _OPEN_CLIP_LAYER and m[3] in ("weight", "bias"):
            out.same(f"{prefix}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}", st)
        else:
            out.unknown.append(st.key)


_T5_KEEP = re.compile(r"encoder\.(block\.\d+\..+|final_layer_norm\.weight)")
_T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")


def _convert_t5(section: Section, out: _Out) -> None:
    """T5 encoder -> transformers T5EncoderModel names. The token embedding is tied in
    transformers (``encoder.embed_tokens`` is ``shared``): whichever of the two a file stores is
    exposed under both names; a decoder half (full T5 checkpoints) and ComfyUI's ``logit_scale``
    are ignored."""
    embedding = None
    for key, st in section.items():
        if key.startswith(("decoder.", "lm_head.")) or key == "logit_scale":
            out.ignored.append(st.key)
        elif key in _T5_EMBEDDINGS:
            if embedding is None or key == "shared.weight":
                if embedding is not None:
                    out.ignored.append(embedding.key)
                embedding = st
            else:
                out.ignored.append(st.key)
        elif _T5_KEEP.fullmatch(key):
            out.same(key, st)
        else:
            out.unknown.append(st.key)
    if embedding is None:
        raise LayoutError(
            out.path,
            "T5 encoder without a token embedding (shared.weight / encoder.embed_tokens.weight)",
        )
    for name in _T5_EMBEDDINGS:
        out.same(name, embedding)


# --------------------------------------------------------------------------------------------
# diffusers names already (a diffusers component file given on its own)

_DIFFUSERS_TOP = {
    "unet": (
        "conv_in", "time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj",
        "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out",
    ),
    "vae": ("encoder", "decoder", "quant_conv", "post_quant_conv"),
    "transformer": (
        "x_embedder", "context_embedder", "time_text_embed", "transformer_blocks",
        "single_transformer_blocks", "norm_out", "proj_out",
    ),
}  # fmt: skip
_VAE_CODER_TOP = ("conv_in", "down_blocks", "up_blocks", "mid_block", "conv_norm_out", "conv_out")
#: Older diffusers versions saved the VAE mid-block attention as query/key/value/proj_attn (early
#: SD 1.5 folders have these names); diffusers renames them on load, so do we.
_VAE_OLD_ATTN = re.compile(
    r"((?:en|de)coder\.mid_block\.attentions\.\d+)"
    r"\.(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)"
    r"\.(weight|bias)"
)
_VAE_OLD_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _identity(component: str) -> Converter:
    top = _DIFFUSERS_TOP[component]

    def convert(section: Section, out: _Out) -> None:
        for key, st in section.items():
            first = key.split(".", 1)[0]
            if first not in top:
                out.unknown.append(st.key)
                continue
            if component == "vae" and first in ("encoder", "decoder"):
                if key.split(".")[1] not in _VAE_CODER_TOP:
                    out.unknown.append(st.key)
                    continue
                m = _VAE_OLD_ATTN.fullmatch(key)
                if m:
                    name = _VAE_OLD_NAMES.get(m[2], m[2])
                    mt = _linear_view(st, out.path) if m[3] == "weight" else single(st)
                    out.put(f"{m[1]}.{name}.{m[3]}", mt)
                    continue
            out.same(key, st)

    convert.__doc__ = f"diffusers {component} names: identity (after checking the module names)."
    return convert


# --------------------------------------------------------------------------------------------
# Tiny VAE decoders (AutoencoderTiny): diffusers ``decoder.layers.N.*`` or madebyollin's original
# ``taesd_decoder.safetensors`` (``N.*``: the same nn.Sequential with the Clamp module at index 0,
# so original N is diffusers N - 1). The encoder half of a diffusers file is not used.

_TAESD_ORIG_RE = re.compile(r"(\d+)\.(.+)")


def _convert_taesd_diffusers(section: Section, out: _Out) -> None:
    """diffusers AutoencoderTiny: the decoder's names as they are, the encoder ignored."""
    for key, st in section.items():
        if key.startswith("decoder.layers."):
            out.same(key, st)
        elif key.startswith("encoder.layers."):
            out.ignored.append(st.key)
        else:
            out.unknown.append(st.key)


def _convert_taesd_original(section: Section, out: _Out) -> None:
    """madebyollin's ``taesd_decoder.safetensors``: ``N.rest`` → ``decoder.layers.{N-1}.rest``
    (index 0 is the weightless Clamp; a ``0.weight`` is an encoder's first conv: not a decoder)."""
    for key, st in section.items():
        m = _TAESD_ORIG_RE.fullmatch(key)
        if m is None or int(m[1]) == 0:
            out.unknown.append(st.key)
        else:
            out.same(f"decoder.layers.{int(m[1]) - 1}.{m[2]}", st)


def _is_taesd_original(keys: list[str]) -> bool:
    """Bare numbered keys only, the first conv at index 1 (after the Clamp): a TAESD decoder file."""
    return "1.weight" in keys and all(_TAESD_ORIG_RE.fullmatch(k) for k in keys)


# --------------------------------------------------------------------------------------------
# Detection

#: (kind, component, converter)
_KINDS: dict[str, tuple[str, Converter]] = {
    "ldm-unet": ("unet", _convert_ldm_unet),
    "ldm-vae": ("vae", _convert_ldm_vae),
    "bfl-flux": ("transformer", _convert_bfl_flux),
    "clip": ("text_encoder", _convert_clip),
    "t5": ("text_encoder_2", _convert_t5),
    "open-clip": ("text_encoder_2", _convert_open_clip),
    "diffusers-unet": ("unet", _identity("unet")),
    "diffusers-vae": ("vae", _identity("vae")),
    "diffusers-transformer": ("transformer", _identity("transformer")),
    "diffusers-taesd": ("taesd", _convert_taesd_diffusers),
    "taesd": ("taesd", _convert_taesd_original),
}

#: Wrapper prefixes of multi-model single files -> what is inside ("diffusion" = decided by
#: content: LDM UNet for SD, BFL FLUX in ComfyUI files).
_WRAPPERS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "diffusion"),
    ("first_stage_model.", "ldm-vae"),
    ("vae.", "ldm-vae"),
    ("cond_stage_model.transformer.", "clip"),
    ("conditioner.embedders.0.transformer.", "clip"),  # SDXL (SGM): CLIP-L
    ("conditioner.embedders.1.model.", "open-clip"),  # SDXL (SGM): OpenCLIP bigG
    ("text_encoders.clip_l.transformer.", "clip"),
    ("text_encoders.t5xxl.transformer.", "t5"),
)
#: Stored in LDM training checkpoints, never needed for inference.
_IGNORED_PREFIXES = ("model_ema.",)
_LDM_BUFFERS = frozenset(
    {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
        "logvar",
    }
)  # fmt: skip

#: Bare-key markers, tried in order: (kind, key prefixes that identify it).
_BARE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bfl-flux", ("double_blocks.", "single_blocks.")),
    ("ldm-unet", ("input_blocks.", "output_blocks.", "middle_block.")),
    ("ldm-vae", ("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")),
    ("t5", ("encoder.block.",)),
    ("diffusers-taesd", ("decoder.layers.",)),  # before CLIP: its encoder half has encoder.layers.*
    (
        "clip",
        (
            "text_model.",
            "transformer.text_model.",
            "encoder.layers.",
            "embeddings.token_embedding.",
        ),
    ),
    ("diffusers-transformer", ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")),
    ("diffusers-vae", ("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")),
    ("diffusers-unet", ("down_blocks.", "up_blocks.", "mid_block.", "time_embedding.")),
)
_DIFFUSION_MARKERS = {"bfl-flux": _BARE_MARKERS[0][1], "ldm-unet": _BARE_MARKERS[1][1]}


def _kind_of(keys: list[str], candidates: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for kind, prefixes in candidates:
        if any(k.startswith(prefixes) for k in keys):
            return kind
    return None


def _recognised_summary(keys: list[str]) -> str:
    """Which known prefixes/patterns matched how many keys, for error messages."""
    patterns = [p for p, _ in _WRAPPERS] + list(_IGNORED_PREFIXES)
    patterns += [p for _, prefixes in _BARE_MARKERS for p in prefixes]
    counts = {f"{p}*": sum(k.startswith(p) for k in keys) for p in dict.fromkeys(patterns)}
    counts["LDM schedule buffers"] = sum(k in _LDM_BUFFERS for k in keys)
    hits = [f"{p}: {n} keys" for p, n in counts.items() if n]
    if not hits:
        return "none of the known key patterns (" + ", ".join(counts) + ")"
    return ", ".join(hits)


def _unknown_layout(keys: list[str], unknown: list[str], path: str, why: str) -> LayoutError:
    examples = ", ".join(repr(k) for k in sorted(unknown)[:4])
    return LayoutError(
        path,
        f"{why}: recognised {_recognised_summary(keys)}; {len(unknown)} of {len(keys)} keys not "
        f"recognised, e.g. {examples}",
    )


def detect_layout(tensors: dict[str, StoredTensor], path: str) -> LayoutResult:
    """Recognise the key layout of a single-file checkpoint (or a set of shards) from its key
    names and shapes, and map every stored key to its component's internal name.

    Raises LayoutError (one line: what was recognised, examples of what was not) when the file
    is no layout we know, or when some of its keys do not fit the layout it otherwise has.
    """
    if not tensors:
        raise LayoutError(path, "no tensors in checkpoint")
    tensors, scales, scale_ignored = split_scales(tensors, path)  # ComfyUI scaled fp8
    keys = list(tensors)

    sections: dict[str, tuple[str, dict[str, StoredTensor]]] = {}  # prefix -> (kind, section)
    ignored: list[str] = list(scale_ignored)
    bare: dict[str, StoredTensor] = {}
    for key, st in tensors.items():
        for prefix, kind in _WRAPPERS:
            if key.startswith(prefix):
                sections.setdefault(prefix, (kind, {}))[1][key[len(prefix) :]] = st
                break
        else:
            if key.startswith(_IGNORED_PREFIXES):
                ignored.append(key)
            else:
                bare[key] = st

    unknown: list[str] = []
    if sections:
        for key in bare:
            (ignored if key in _LDM_BUFFERS else unknown).append(key)
        for prefix, (kind, section) in list(sections.items()):
            if kind == "diffusion":
                found = _kind_of(list(section), tuple(_DIFFUSION_MARKERS.items()))
                if found is None:
                    unknown += [prefix + k for k in section]
                    del sections[prefix]
                    continue
                sections[prefix] = (found, section)
    else:
        kind = _kind_of(keys, _BARE_MARKERS) or ("taesd" if _is_taesd_original(keys) else None)
        if kind is None:
            raise _unknown_layout(keys, keys, path, "unknown checkpoint layout")
        sections[""] = (kind, bare)
    if not sections:
        raise _unknown_layout(keys, unknown, path, "unknown checkpoint layout")

    components: dict[str, dict[str, MappedTensor]] = {}
    kinds: list[str] = []
    has_quant = False
    for prefix, (kind, section) in sections.items():
        component, convert = _KINDS[kind]
        if component in components:
            raise LayoutError(
                path, f"two {component} models in one file (second under {prefix or 'no prefix'!r})"
            )
        out = _Out(component, path)
        convert(section, out)
        attach_scales(out.tensors, scales, path)
        components[component] = out.tensors
        ignored += out.ignored
        unknown += out.unknown
        kinds.append(kind)
        has_quant |= "quant_conv.weight" in section
    if unknown:
        raise _unknown_layout(
            keys, unknown, path, f"checkpoint looks like {'+'.join(kinds)} but does not fit it"
        )
    for component, mapped in components.items():
        if not mapped:
            raise LayoutError(path, f"no {component} weights found (all its keys are ignored ones)")

    return LayoutResult(
        _layout_name(kinds, bool(sections.keys() - {""}), has_quant), components, sorted(ignored)
    )


def _layout_name(kinds: list[str], wrapped: bool, has_quant: bool) -> str:
    if "bfl-flux" in kinds:
        return "bfl-flux"
    if "open-clip" in kinds:
        return "sgm-sdxl"
    if wrapped or "ldm-unet" in kinds:
        return "ldm-sd15"
    kind = kinds[0]
    if kind == "ldm-vae":
        return "ldm-vae" if has_quant else "bfl-ae"
    if kind == "clip":
        return "comfy-clip-l"
    if kind == "t5":
        return "comfy-t5"
    if kind == "taesd":
        return "taesd"
    return "diffusers"


def map_component(
    component: str, tensors: dict[str, StoredTensor], path: str
) -> dict[str, MappedTensor]:
    """Map the tensors of one diffusers component folder (``unet/``, ``vae/``, ``transformer/``,
    ``text_encoder/``, ``text_encoder_2/``; all shards together) to internal names.

    Diffusers-named files map to themselves (with diffusers' own load-time fix-ups: old VAE
    attention names, T5's tied embedding, CLIP's ``position_ids``); a file in another layout
    dropped into the folder (e.g. BFL ``flux1-dev.safetensors`` in ``transformer/``) is
    recognised and converted. Raises LayoutError if the folder holds another component.
    """
    if component not in COMPONENTS:
        raise LayoutError(path, f"unknown component {component!r} (known: {', '.join(COMPONENTS)})")
    result = detect_layout(tensors, path)
    if component == "text_encoder_2" and "text_encoder" in result.components:
        # SDXL's OpenCLIP bigG (CLIPTextModelWithProjection): CLIP names, and its projection is used
        mapped = dict(result.components["text_encoder"])
        if "text_projection.weight" in tensors:
            mapped["text_projection.weight"] = single(tensors["text_projection.weight"])
        return mapped
    if component not in result.components:
        found = ", ".join(result.components)
        raise LayoutError(
            path, f"expected {component} weights but found {found} ({result.layout} layout)"
        )
    return result.components[component]
