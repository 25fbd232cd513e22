"""``--resume`` mid-run for the samplers whose state matters (issue #14): ``dpmpp_2m`` keeps the
previous step's denoised sample, ``pndm`` the last model outputs of its linear multistep. A demo
run (6 steps, 64²) is interrupted right after the checkpoint of its second denoiser call is
written — deterministically: the runner raises ``KeyboardInterrupt`` there, the same exception
Ctrl-C gives — then resumed with ``--resume``; the PNG must be byte-identical to an uninterrupted
run's. A sampler state lost or restored wrong on resume changes the remaining steps and so the
pixels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
STOP_AFTER = 1  # the checkpoint of denoiser call 2 (0-based 1) of 6

INTERRUPT = r"""
import sys
from streamexec import run
from streamexec.cli import main
stop = int(sys.argv[1])
write = run.write_checkpoint
def write_then_stop(path, step, *a, **k):  # Ctrl-C right after this checkpoint is on disk
    write(path, step, *a, **k)
    if step == stop:
        raise KeyboardInterrupt
run.write_checkpoint = write_then_stop
sys.exit(main(sys.argv[2:]))
"""

#: The same resume with the sampler's saved history ignored (a fresh sampler at the checkpoint's
#: step): proves the history changes the pixels, so the byte-identical check above can fail.
FORGETFUL = r"""
import sys
from streamexec.pipelines.schedulers.base import Scheduler
from streamexec.cli import main
Scheduler.load_state_dict = lambda self, state: None
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return dict(os.environ, STREAMEXEC_CACHE=str(tmp_path_factory.mktemp("cache")),
                TMPDIR=str(tmp_path_factory.mktemp("tmp")))


def argv(sampler: str, out: Path, lat: Path, *extra: str) -> list[str]:
    return ["run", "plans/demo.yaml", "--prompt", "a lighthouse", "--seed", "3", "--steps", str(STEPS),
            "--height", "64", "--width", "64", "--sampler", sampler, "--quiet", "--latents-out", str(lat),
            "-o", str(out), *extra]


def cli(args: list[str], env: dict, *prefix: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(prefix or ("-m", "streamexec")), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "pndm"])
def test_mid_run_resume_gives_the_same_png(sampler: str, env: dict, tmp_path: Path) -> None:
    ref, ref_lat = tmp_path / "ref.png", tmp_path / "ref.npy"
    res = cli(argv(sampler, ref, ref_lat), env)
    assert res.returncode == 0, res.stderr[-2000:]

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, lat = out_dir / "b.png", tmp_path / "L.npy"
    res = cli(argv(sampler, out, lat), env, "-c", INTERRUPT, str(STOP_AFTER))
    assert res.returncode == 130, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "streamexec: interrupted"
    assert list(out_dir.iterdir()) == []
    meta = json.loads(Path(str(lat) + ".json").read_text())
    assert meta["step"] == STOP_AFTER
    saved = {p: p.read_bytes() for p in tmp_path.glob("L.*")}

    res = cli(argv(sampler, out, lat, "--resume"), env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming after denoiser call {STOP_AFTER + 1}" in res.stderr, res.stderr[-2000:]
    assert out.read_bytes() == ref.read_bytes()

    for p, b in saved.items():  # the checkpoint as it was at the interruption
        p.write_bytes(b)
    forgot = tmp_path / "forgot.png"
    res = cli(argv(sampler, forgot, lat, "--resume"), env, "-c", FORGETFUL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert forgot.read_bytes() != ref.read_bytes(), "the sampler history made no difference: the test proves nothing"
