"""Parity of the SDXL / SD 2.x model parts against diffusers/transformers on torch CPU f32, through
the public API ``streamexec.load``, at small seeded configs (tolerance as tests/test_parity_sd.py:
max|ours - ref| / max|ref| <= 1e-4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from helpers import randomize, rel_err

import streamexec

TOL = 1e-4

#: SDXL's UNet shape at toy size: a plain first level, 2 transformer layers in the second, the
#: ``text_time`` added conditioning (pooled width 10, 6 time ids of 8), linear projections,
#: per-level heads and SD 2.1's ``upcast_attention``.
SDXL_LIKE = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=20, norm_num_groups=8,
    use_linear_projection=True, upcast_attention=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=10 + 6 * 8,
)


def test_sdxl_unet_parity(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**SDXL_LIKE).eval()
    randomize(model, 5)
    model.save_pretrained(tmp_path / "unet")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, 20, generator=g)
    t = torch.tensor([999.0, 17.0])
    text = torch.randn(2, 10, generator=g)
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 768.0, 16.0, 32.0, 640.0, 896.0]])
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
        plain = model(x, t, encoder_hidden_states=ctx,
                      added_cond_kwargs={"text_embeds": text, "time_ids": ids.flip(1)}).sample
    assert rel_err(plain, ref) > 1e-3  # the time ids matter (and their order), so the comparison tests them
    m = streamexec.load(tmp_path / "unet", component="unet")
    ours = m(sample=x.numpy(), timestep=t.numpy(), encoder_hidden_states=ctx.numpy(), text_embeds=text.numpy(),
             time_ids=ids.numpy())
    assert rel_err(ours, ref) <= TOL


def test_clip_with_projection_penultimate_parity(tmp_path: Path) -> None:
    """SDXL's text_encoder_2 (OpenCLIP bigG as CLIPTextModelWithProjection, gelu, pads with "!"
    = id 0): ``hidden_states[-2]`` and the projected pooled output ``text_embeds``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=2, hidden_act="gelu",
                         projection_dim=24)
    model = CLIPTextModelWithProjection(cfg).eval()
    randomize(model, 7)
    model.save_pretrained(tmp_path / "text_encoder_2")
    ids = torch.tensor([[97, 5, 17, 98, 0, 0], [97, 40, 98, 0, 0, 0]])  # 98 = highest id = "EOS"
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    te = streamexec.load(tmp_path / "text_encoder_2", component="text_encoder_2")
    h, pooled = te(input_ids=ids.numpy(), penultimate=True)
    assert rel_err(h, ref.hidden_states[-2]) <= TOL
    assert rel_err(pooled, ref.text_embeds) <= TOL
    last, _ = te(input_ids=ids.numpy())
    assert rel_err(last, ref.last_hidden_state) <= TOL


def test_clip_penultimate_parity(tmp_path: Path) -> None:
    """SDXL's text_encoder (CLIP-L): ``hidden_states[-2]``; the pooled output stays unprojected."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=2)
    model = CLIPTextModel(cfg).eval()
    randomize(model, 8)
    model.save_pretrained(tmp_path / "text_encoder")
    ids = torch.tensor([[97, 5, 17, 98, 98, 98]])
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    h, pooled = streamexec.load(tmp_path / "text_encoder", component="text_encoder")(input_ids=ids.numpy(),
                                                                                     penultimate=True)
    assert rel_err(h, ref.hidden_states[-2]) <= TOL
    assert rel_err(pooled, ref.pooler_output) <= TOL


def _full_size_graph(model: str, build, make, **kw):
    """The graph our builder makes from a shipped published config, with diffusers/transformers'
    parameter shapes for it (meta device: no memory), and those parameters."""
    import json

    from streamexec.configs import reference

    cfg = json.loads((reference(model) / kw.pop("part") / "config.json").read_text())
    with torch.device("meta"):
        ref = make(cfg)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    graph = build(cfg, lambda k: (shapes[k], "f32") if k in shapes else None, **kw)
    return graph, shapes


def test_shipped_sdxl_configs_build_every_weight() -> None:
    """The published SDXL UNet and bigG configs give graphs that use every parameter diffusers /
    transformers make for them, with their shapes (2,567,463,684 and 694,659,840 parameters)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from streamexec.models.clip import build_clip_text
    from streamexec.models.unet import build_unet

    def used(graph) -> set[str]:
        return {w for op in graph.ops for w in op.weights.values()}

    graph, shapes = _full_size_graph("sdxl", build_unet, UNet2DConditionModel.from_config, part="unet", batch=2,
                                     height=128, width=128, seq_len=77)
    assert used(graph) == set(shapes)
    assert sum(int(np.prod(shapes[k])) for k in shapes) == 2_567_463_684
    graph, shapes = _full_size_graph(
        "sdxl", build_clip_text, lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)), part="text_encoder_2",
        batch=2, seq_len=77, penultimate=True)
    shapes.pop("text_model.embeddings.position_ids", None)
    assert used(graph) == set(shapes)
    assert sum(int(np.prod(shapes[k])) for k in shapes) == 694_659_840


def test_open_clip_single_file_parity(tmp_path: Path) -> None:
    """bigG as SDXL single files store it (``conditioner.embedders.1.model.*``: fused ``in_proj``,
    projection stored [width, proj]) runs like transformers' CLIPTextModelWithProjection. Widths
    fit the shipped bigG config a lone file gets (20 heads, gelu)."""
    from safetensors.numpy import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=40, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=20, max_position_embeddings=12, eos_token_id=2, bos_token_id=0,
                         hidden_act="gelu", projection_dim=24)
    model = CLIPTextModelWithProjection(cfg).eval()
    randomize(model, 9)
    sd = {k.removeprefix("text_model."): v.numpy() for k, v in model.state_dict().items()}
    p = "conditioner.embedders.1.model."
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"], p + "ln_final.bias": sd["final_layer_norm.bias"],
           p + "text_projection": np.ascontiguousarray(sd["text_projection.weight"].T),
           p + "logit_scale": np.ones((), np.float32)}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(2):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = np.concatenate(
                [sd[f"{src}self_attn.{q}.{leaf}"] for q in ("q_proj", "k_proj", "v_proj")])
            for ours, theirs in names.items():
                out[f"{dst}{ours}.{leaf}"] = sd[f"{src}{theirs}.{leaf}"]
    save_file(out, str(tmp_path / "bigg.safetensors"))
    ids = torch.tensor([[0, 5, 17, 63, 0, 0], [0, 40, 63, 0, 0, 0]])  # 63 = highest id = "EOS"; pads "!" = 0
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    te = streamexec.load(tmp_path / "bigg.safetensors", component="text_encoder_2")
    h, pooled = te(input_ids=ids.numpy(), penultimate=True)
    assert rel_err(h, ref.hidden_states[-2]) <= TOL
    assert rel_err(pooled, ref.text_embeds) <= TOL
