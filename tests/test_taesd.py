"""The tiny VAE decoders (diffusers' AutoencoderTiny decoder: TAESD, TAESDXL, TAEF1) against diffusers
on torch CPU f32, through ``streamexec.load``: a diffusers folder at a tiny random config, and the
published full width (64 channels, blocks 3/3/3/1) from a file in madebyollin's original
``taesd_decoder.safetensors`` naming, with 4 (TAESD) and 16 (TAEF1) latent channels.

Tolerance: max|ours - ref| / max|ref| <= 1e-4 (f32 both sides; summation order in the convs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import original_decoder_file, rel_err, tiny_autoencoder
from safetensors.torch import save_file

import streamexec
from streamexec.errors import StreamexecError

TOL = 1e-4


def _latents(latent: int, size: int, seed: int) -> torch.Tensor:
    # scaled by 2.5 so that the tanh clamp is far from the identity
    return 2.5 * torch.randn(1, latent, size, size, generator=torch.Generator().manual_seed(seed))


def test_tiny_config_folder_parity(tmp_path: Path) -> None:
    model = tiny_autoencoder(4, 8, (2, 1, 1), seed=0)  # two upsamples: 4x
    model.save_pretrained(tmp_path / "taesd")
    z = _latents(4, 5, 1)
    with torch.no_grad():
        ref = model.decode(z).sample
    tiny = streamexec.load(tmp_path / "taesd", component="taesd")
    out = tiny.decode(z.numpy())
    assert out.shape == (1, 3, 20, 20)
    assert rel_err(out, ref) <= TOL
    assert np.array_equal(tiny.latents_from_model(z.numpy()), z.numpy())  # scaling 1.0, shift 0


@pytest.mark.parametrize("latent", [4, 16], ids=["taesd", "taef1"])
def test_full_width_original_file_parity(tmp_path: Path, latent: int) -> None:
    model = tiny_autoencoder(latent, 64, (3, 3, 3, 1), seed=2)
    path = original_decoder_file(model, tmp_path / "taesd_decoder.safetensors")
    z = _latents(latent, 16, 3)
    with torch.no_grad():
        ref = model.decode(z).sample
    tiny = streamexec.load(path)  # the one component of the file: "taesd"
    assert tiny.component.name == "taesd"
    out = tiny.decode(z.numpy())
    assert out.shape == (1, 3, 128, 128)
    assert rel_err(out, ref) <= TOL


def test_diffusers_single_file_ignores_encoder(tmp_path: Path) -> None:
    model = tiny_autoencoder(4, 8, (1, 1), seed=4)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    z = _latents(4, 3, 5)
    with torch.no_grad():
        ref = model.decode(z).sample
    assert rel_err(streamexec.load(path, component="taesd").decode(z.numpy()), ref) <= TOL


def test_encoder_file_and_full_vae_are_refused(tmp_path: Path) -> None:
    model = tiny_autoencoder(4, 8, (1, 1), seed=6)
    enc = tmp_path / "taesd_encoder.safetensors"  # original encoder naming: its first conv is 0.weight
    save_file({k.removeprefix("layers."): v.contiguous() for k, v in model.encoder.state_dict().items()}, str(enc))
    with pytest.raises(StreamexecError, match="unknown checkpoint layout"):
        streamexec.load(enc)
    from helpers import tiny_vae

    vae = tiny_vae((8, 8), 4, 0)
    full = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(full))
    with pytest.raises(StreamexecError, match="no component 'taesd'"):
        streamexec.load(full, component="taesd")


def test_described_and_planned_from_the_file(tmp_path: Path) -> None:
    from streamexec.models.describe import describe_checkpoint
    from streamexec.models.registry import RunShape, build_component
    from streamexec.weights.checkpoint import open_checkpoint

    path = original_decoder_file(tiny_autoencoder(16, 8, (1, 1, 1, 1), seed=8), tmp_path / "taef1.safetensors")
    ckpt = open_checkpoint(path)
    text = describe_checkpoint(ckpt)
    assert "taesd layout" in text and "AutoencoderTiny decoder (TAEF1): 16 latent channels, width 8" in text
    comp = ckpt.component("taesd")
    graph = build_component("taesd", {}, lambda k: None if (t := comp.tensors.get(k)) is None else (t.shape, t.dtype),
                            RunShape(64, 32), {}, str(path))
    assert graph.inputs["z"] == (1, 16, 8, 4) and graph.tensors[graph.outputs[0]] == (1, 3, 64, 32)
    ckpt.close()
