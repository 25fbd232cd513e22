"""Parity of the SDXL / SD 2.x model parts against diffusers/transformers on torch CPU f32, through
the public API ``streamexec.load``, at small seeded configs (tolerance as tests/test_parity_sd.py:
max|ours - ref| / max|ref| <= 1e-4)."""

from __future__ import annotations

from pathlib import Path

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
