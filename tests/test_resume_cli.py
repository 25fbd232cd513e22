"""``--resume`` through the CLI on a FLUX.1-schnell pipeline (issue #8): a run that writes a
``--latents-out`` checkpoint after every step, interrupted mid-denoise by Ctrl-C (SIGINT) or
SIGTERM, exits 130 with no PNG; the same command with ``--resume`` continues after the last
checkpoint (not from step 0) and writes a PNG byte-identical to an uninterrupted run's, metadata
included. A checkpoint written by another run (other seed or prompt) is refused with one line.

The pipeline is the tiny random-weight FLUX.1-schnell folder of test_pipelines.py, run at 256×256
(4096 image tokens) for 24 steps so that an interruption seen after step 1 lands well before the end.
"""

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
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from helpers import flux_folder  # noqa: E402 - the tiny FLUX folder builder (needs torch/diffusers)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
SIZE = 256
PROMPT = "a lighthouse at dusk"

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    scratch = tmp_path_factory.mktemp("tmp")
    return dict(os.environ, TMPDIR=str(scratch))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return flux_folder(tmp_path_factory.mktemp("flux"), dev=False)


def args(model: Path, out: Path, latents: Path, *extra: str, seed: str = "1", prompt: str = PROMPT) -> list[str]:
    return [sys.executable, "-m", "streamexec", "run", str(model), "--prompt", prompt, "--seed", seed,
            "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE), "--latents-out", str(latents),
            "-o", str(out), *extra]


def run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(model: Path, env: dict, tmp_path_factory) -> tuple[Path, Path]:
    """The reference: the same command, never interrupted (PNG, final latents checkpoint)."""
    d = tmp_path_factory.mktemp("a")
    out, lat = d / "a.png", d / "L.npy"
    res = run(args(model, out, lat), env)
    assert res.returncode == 0, res.stderr[-2000:]
    return out, lat


def checkpoint_step(lat: Path) -> int:
    try:
        return int(json.loads(Path(str(lat) + ".json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1  # not written yet


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_flux_run_resumes_to_the_same_png(model: Path, env: dict, uninterrupted, tmp_path: Path,
                                                      sig: signal.Signals) -> None:
    a_png, _ = uninterrupted
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, lat = out_dir / "b.png", tmp_path / "L.npy"
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:  # files: no pipe to fill
        proc = subprocess.Popen(args(model, out, lat), stdout=so, stderr=se, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline and checkpoint_step(lat) < 1:
                time.sleep(0.005)
            seen = checkpoint_step(lat)
            assert proc.poll() is None, f"the run ended before it could be interrupted (checkpoint step {seen})"
            proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = (tmp_path / "stderr").read_text()
    assert rc == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "streamexec: interrupted"
    assert list(out_dir.iterdir()) == []  # no PNG, no .part file
    k = checkpoint_step(lat)
    assert 1 <= seen <= k < STEPS - 1, f"interrupted after step {k} of {STEPS}: not mid-run"

    res = run(args(model, out, lat, "--resume"), env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming after denoiser call {k + 1}" in res.stderr  # from the checkpoint, not from step 0
    assert "starting from step 0" not in res.stderr
    with Image.open(out) as b, Image.open(a_png) as a:
        assert b.text == a.text  # the same generation parameters in the PNG
        assert b.tobytes() == a.tobytes()  # the same pixels
    assert out.read_bytes() == a_png.read_bytes()  # and the same file, byte for byte
    print(f"{sig.name} after checkpoint step {k} (seen {seen}) of {STEPS}; resumed at call {k + 1}: identical PNG")


@pytest.mark.parametrize("change", [("--seed", "2"), ("--prompt", "a cat")], ids=["seed", "prompt"])
def test_resume_from_another_runs_checkpoint_is_refused(model: Path, env: dict, uninterrupted, tmp_path: Path,
                                                        change: tuple[str, str]) -> None:
    _, lat = uninterrupted
    before = lat.read_bytes()
    out = tmp_path / "x.png"
    kw = {"seed": change[1]} if change[0] == "--seed" else {"prompt": change[1]}
    res = run(args(model, out, lat, "--resume", **kw), env)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last == (f"streamexec: error: {lat} was written by a different run ({change[0][2:]} differ); "
                    "not resuming")
    assert "Traceback" not in res.stderr
    assert not out.exists() and lat.read_bytes() == before  # nothing written, the checkpoint kept


@pytest.fixture(scope="module")
def sd_checkpoint(env: dict, tmp_path_factory) -> tuple[list[str], Path, Path]:
    """A completed 3-step dpmpp_2m run of the SD demo model at 128×128 with ``--latents-out`` (a
    multistep sampler: the checkpoint has a .state.npz too): its command, PNG and checkpoint."""
    d = tmp_path_factory.mktemp("sd")
    out, lat = d / "a.png", d / "L.npy"
    argv = [sys.executable, "-m", "streamexec", "run", "plans/demo.yaml", "--prompt", PROMPT, "--seed", "5",
            "--steps", "3", "--height", "128", "--width", "128", "--sampler", "dpmpp_2m", "--latents-out", str(lat)]
    res = run([*argv, "-o", str(out)], env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(str(lat) + ".state.npz").is_file()
    return argv, out, lat


def _copy_checkpoint(lat: Path, to: Path) -> Path:
    for suffix in ("", ".json", ".state.npz"):
        (to / (lat.name + suffix)).write_bytes(Path(str(lat) + suffix).read_bytes())
    return to / lat.name


def _tamper_latents(lat: Path) -> None:  # as if cut short: the next step's latents under this step's .json
    np.save(lat, np.load(lat) * np.float32(0.5))


def _tamper_state(lat: Path) -> None:
    f = Path(str(lat) + ".state.npz")
    with np.load(f) as z:
        state = {k: z[k] for k in z.files}
    k = sorted(state)[0]
    state[k] = state[k] + 1
    np.savez(f, **state)


@pytest.mark.parametrize("tamper,names", [(_tamper_latents, "L.npy does"), (_tamper_state, "L.npy.state.npz does")],
                         ids=["latents", "state"])
def test_resume_refuses_checkpoint_files_that_disagree(env: dict, sd_checkpoint, tmp_path: Path, tamper,
                                                       names: str) -> None:
    argv, a_png, lat0 = sd_checkpoint
    lat = _copy_checkpoint(lat0, tmp_path)
    out = tmp_path / "b.png"
    res = run([*[str(lat) if a == str(lat0) else a for a in argv], "-o", str(out), "--resume"], env)
    assert res.returncode == 0, res.stderr[-2000:]  # the intact copy resumes (after the last step)
    assert "resuming after denoiser call 3" in res.stderr
    assert out.read_bytes() == a_png.read_bytes()
    out.unlink()

    tamper(lat)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    res = run([*[str(lat) if a == str(lat0) else a for a in argv], "-o", str(out), "--resume"], env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last == (f"streamexec: error: {lat}: checkpoint files disagree ({names} not match the digest in "
                    "L.npy.json); not resuming")
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing removed
