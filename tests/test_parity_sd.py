"""Parity of the SD 1.5 family (UNet, CLIP text encoder, VAE) against diffusers/transformers on
torch CPU f32, through the public API ``streamexec.load``, at small seeded configs.

Tolerance: max|ours - ref| / max|ref| <= 1e-4 for every model (f32 on both sides; the
difference is summation order in GEMMs and our own exp/erf kernels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import UNET_CONFIGS, VAE_CONFIGS, randomize, rel_err

import streamexec

TOL = 1e-4


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_parity(tmp_path: Path, name: str) -> None:
    from diffusers import UNet2DConditionModel

    cfg = UNET_CONFIGS[name]
    model = UNet2DConditionModel(**cfg).eval()
    randomize(model, 0)
    model.save_pretrained(tmp_path / "unet")
    g = torch.Generator().manual_seed(1)
    b, size = 2, cfg["sample_size"]
    x = torch.randn(b, cfg["in_channels"], size, size, generator=g)
    ctx = torch.randn(b, 7, cfg["cross_attention_dim"], generator=g)
    t = torch.tensor([999.0, 17.0])
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=ctx).sample
    m = streamexec.load(tmp_path / "unet", component="unet")
    ours = m(sample=x.numpy(), timestep=t.numpy(), encoder_hidden_states=ctx.numpy())
    assert rel_err(ours, ref) <= TOL


def test_clip_parity(tmp_path: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=2)
    model = CLIPTextModel(cfg).eval()
    randomize(model, 2)
    model.save_pretrained(tmp_path / "te")
    ids = torch.tensor([[0, 5, 17, 98, 3, 3], [0, 40, 98, 3, 3, 3]])  # 98 = highest id = "EOS"
    with torch.no_grad():
        ref = model(ids)
    h, pooled = streamexec.load(tmp_path / "te", component="text_encoder")(input_ids=ids.numpy())
    assert rel_err(h, ref.last_hidden_state) <= TOL
    assert rel_err(pooled, ref.pooler_output) <= TOL


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_parity(tmp_path: Path, name: str) -> None:
    from diffusers import AutoencoderKL

    cfg = VAE_CONFIGS[name]
    n = len(cfg["block_out_channels"])
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                          up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=8,
                          **cfg).eval()
    randomize(model, 3)
    model.save_pretrained(tmp_path / "vae")
    g = torch.Generator().manual_seed(4)
    f = 2 ** (n - 1)
    z = torch.randn(1, cfg["latent_channels"], 6, 5, generator=g)
    img = torch.randn(1, 3, 6 * f, 5 * f, generator=g)
    with torch.no_grad():
        ref_dec = model.decode(z).sample
        ref_enc = model.encode(img).latent_dist.mean
    vae = streamexec.load(tmp_path / "vae", component="vae")
    assert rel_err(vae.decode(z.numpy()), ref_dec) <= TOL
    assert rel_err(vae.encode(img.numpy()), ref_enc) <= TOL
    if cfg.get("shift_factor"):
        assert vae.shift_factor == pytest.approx(0.1159) and vae.scaling_factor == pytest.approx(0.3611)
