"""The tiny decoder in the pipelines: ``Pipeline.use_tiny_decoder`` (the final image is the tiny
decoder's, checked against diffusers' AutoencoderTiny on the run's latents), and ``streamexec run
--taesd FILE --preview FILE.png`` on the SD demo model: previews written each step (the last one is
the final image), removed on Ctrl-C unless --keep-preview, bad input refused with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import original_decoder_file, tiny_autoencoder
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "2", "--height", "128", "--width", "128", "--prompt", "a cat", "--seed", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-latent-channel tiny decoder (8× upsampling, width 8) and its original-naming file."""
    model = tiny_autoencoder(4, 8, (1, 1, 1, 1), seed=7)
    return model, original_decoder_file(model, tmp_path_factory.mktemp("taesd") / "taesd_decoder.safetensors")


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamexec", "run", "plans/demo.yaml", *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)


def test_pipeline_final_image_is_the_tiny_decoders(env: dict, tiny) -> None:
    from streamexec.pipelines.demo import ensure_demo_model
    from streamexec.pipelines.generate import Request, open_pipeline

    os.environ["STREAMEXEC_CACHE"] = env["STREAMEXEC_CACHE"]
    model, path = tiny
    with open_pipeline(ensure_demo_model()) as pipe:
        pipe.use_tiny_decoder(path)
        result = pipe(Request(prompt="a cat", steps=2, height=128, width=128, seed=2))
    with torch.no_grad():  # AutoencoderTiny's scaling_factor is 1.0: pipelines pass the latents as they are
        ref = model.decode(torch.from_numpy(result.latents)).sample[0].numpy()
    ref8 = np.clip(ref / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255
    assert result.image.shape == (128, 128, 3)
    assert np.abs(result.image.astype(np.float64) - ref8).max() <= 0.51  # the same picture up to rounding
    assert result.image.std() > 1  # not a flat picture


def test_run_with_taesd_writes_previews(env: dict, tiny, tmp_path: Path) -> None:
    _, path = tiny
    out, prev = tmp_path / "out.png", tmp_path / "prev.png"
    res = cli(*SMALL, "--taesd", str(path), "--preview", str(prev), "-o", str(out), "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    with Image.open(out) as a, Image.open(prev) as b:
        assert a.size == b.size == (128, 128)
        assert json.loads(b.text["streamexec"])["preview_step"] >= 2  # denoiser calls (PNDM: 3 for 2 steps)
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the last preview is the final (tiny) decode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "prev.png"]  # no .part left


def test_bad_taesd_input_is_one_line_and_writes_nothing(env: dict, tmp_path: Path) -> None:
    from helpers import tiny_vae

    full = tmp_path / "vae.safetensors"  # a full VAE given as the tiny decoder
    save_file({k: v.contiguous() for k, v in tiny_vae((8, 8), 4, 0).state_dict().items()}, str(full))
    out, prev = tmp_path / "out.png", tmp_path / "prev.png"
    for extra, says in ((["--taesd", str(full)], "no component 'taesd'"),
                        (["--preview", str(prev)], "--preview needs a tiny decoder"),
                        (["--taesd", str(full), "--preview-every", "0"], "--preview-every 0")):
        res = cli(*SMALL, *extra, "--preview", str(prev), "-o", str(out), env=env) if "--preview" not in extra \
            else cli(*SMALL, *extra, "-o", str(out), env=env)
        assert res.returncode == 2, res.stderr[-2000:]
        lines = res.stderr.strip().splitlines()
        assert lines[-1].startswith("streamexec: error:") and says in lines[-1], lines
        assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.safetensors"]
    prev.write_bytes(b"an earlier run's preview")  # not this run's: a refused run leaves it alone
    assert cli(*SMALL, "--taesd", str(full), "--preview", str(prev), "-o", str(out), env=env).returncode == 2
    assert prev.read_bytes() == b"an earlier run's preview" and not out.exists()


@pytest.mark.parametrize("keep", [False, True], ids=["removed", "kept"])
def test_ctrl_c_removes_the_preview_unless_kept(env: dict, tiny, tmp_path: Path, keep: bool) -> None:
    _, path = tiny
    out, prev = tmp_path / "never.png", tmp_path / "prev.png"
    argv = [sys.executable, "-m", "streamexec", "run", "plans/demo.yaml", "--prompt", "x", "--steps", "200",
            "--height", "128", "--width", "128", "--taesd", str(path), "--preview", str(prev), "--quiet",
            "-o", str(out)] + (["--keep-preview"] if keep else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not prev.exists():
        time.sleep(0.2)
    assert prev.exists(), "no preview was written"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["prev.png"] if keep else [])  # and no .part file


def test_flux_pipeline_unpacks_latents_for_the_tiny_decoder(tmp_path: Path) -> None:
    from helpers import flux_folder

    from streamexec.pipelines.flux import unpack_latents
    from streamexec.pipelines.generate import Request, open_pipeline

    folder = flux_folder(tmp_path, dev=False)  # 4 latent channels, 2× VAE
    model = tiny_autoencoder(4, 8, (1, 1), seed=9)  # one upsample: 2×
    model.save_pretrained(tmp_path / "taesd")
    with open_pipeline(folder) as pipe:
        pipe.use_tiny_decoder(tmp_path / "taesd")
        result = pipe(Request(prompt="a cat", steps=2, height=32, width=32, seed=3))
        preview = pipe.preview(result.latents)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(unpack_latents(result.latents, 16, 16))).sample[0].numpy()
    ref8 = np.clip(ref / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255
    assert result.image.shape == (32, 32, 3) and np.array_equal(preview, result.image)
    assert np.abs(result.image.astype(np.float64) - ref8).max() <= 0.51


def test_tiny_decoder_for_other_latents_is_refused(env: dict, tmp_path: Path) -> None:
    from streamexec.errors import StreamexecError
    from streamexec.pipelines.demo import ensure_demo_model
    from streamexec.pipelines.generate import open_pipeline

    os.environ["STREAMEXEC_CACHE"] = env["STREAMEXEC_CACHE"]
    path = original_decoder_file(tiny_autoencoder(16, 8, (1, 1), seed=10), tmp_path / "taef1.safetensors")
    with open_pipeline(ensure_demo_model()) as pipe, pytest.raises(StreamexecError, match="16 latent channels"):
        pipe.use_tiny_decoder(path)
