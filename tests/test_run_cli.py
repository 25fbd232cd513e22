"""`streamexec run` end to end, as a user types it: the demo plan, plan → run on a model folder,
identical bytes for the same seed, --latents-out/--resume, and Ctrl-C leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def streamexec(*args: str, env: dict, timeout: int = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamexec", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def test_demo_plan_makes_a_png_with_parameters(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    res = streamexec("run", "plans/demo.yaml", "--prompt", "a lighthouse at dusk", "--seed", "3", "-o", str(out),
                     env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote" in res.stdout and "peak RSS" in res.stdout and "random weights" in res.stdout
    with Image.open(out) as im:
        assert im.size == (256, 256)
        assert im.text["parameters"].startswith("a lighthouse at dusk")
        assert json.loads(im.text["streamexec"])["seed"] == 3
    again = tmp_path / "again.png"
    res = streamexec("run", "plans/demo.yaml", "--prompt", "a lighthouse at dusk", "--seed", "3", "-o", str(again),
                     "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_bytes() == again.read_bytes()  # same seed, same bytes
    other = tmp_path / "other.png"
    assert streamexec("run", "plans/demo.yaml", "--prompt", "a lighthouse at dusk", "--seed", "4", "-o", str(other),
                      "--quiet", env=env).returncode == 0
    assert other.read_bytes() != out.read_bytes()


def test_plan_then_run_on_the_model_folder(env: dict, tmp_path: Path) -> None:
    from streamexec.pipelines.demo import ensure_demo_model

    os.environ["STREAMEXEC_CACHE"] = env["STREAMEXEC_CACHE"]
    model = ensure_demo_model()
    plan = tmp_path / "p.yaml"
    res = streamexec("plan", str(model), "--height", "128", "--width", "128", "--steps", "3", "--memory-budget",
                     "400M", "-o", str(plan), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "x.png"
    lat = tmp_path / "lat.npy"
    res = streamexec("run", str(plan), "--prompt", "a cat", "-o", str(out), "--latents-out", str(lat), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    with Image.open(out) as im:
        assert im.size == (128, 128) and "Steps: 3" in im.text["parameters"]
    assert np.load(lat).shape == (1, 4, 16, 16)
    # a run that resumes from the last checkpoint gives the same image
    res = streamexec("run", str(plan), "--prompt", "a cat", "-o", str(tmp_path / "y.png"), "--latents-out", str(lat),
                     "--resume", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "y.png").read_bytes() == out.read_bytes()


def test_ctrl_c_leaves_no_partial_png_and_no_scratch(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "never.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamexec", "run", "plans/demo.yaml", "--prompt", "x", "--steps", "200",
         "--memory-budget", "smallest", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    started = False
    while time.time() < deadline and proc.poll() is None:
        line = proc.stderr.readline()
        if "denoise" in line:
            started = True
            break
    assert started, "the run never reached the denoise loop"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "streamexec: interrupted"
    assert list(tmp_path.iterdir()) == []  # no PNG, no .part file
    assert list(Path(env["TMPDIR"]).glob("streamexec-spill-*")) == []  # scratch folder removed


def test_template_plan_needs_a_model(env: dict) -> None:
    res = streamexec("run", "plans/sd15-512.yaml", "--prompt", "x", env=env)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "streamexec: error: plans/sd15-512.yaml is a plan template: say which model it runs with --model DIR"]


def test_too_small_budget_fails_before_running_and_trace_is_written(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    res = streamexec("run", "plans/demo.yaml", "--prompt", "x", "--memory-budget", "100M", "-o", str(out), env=env)
    assert res.returncode == 2
    assert "smallest that fits is" in res.stderr.strip().splitlines()[-1]
    assert "text_encoder" not in res.stderr.replace("for CLIPTextModel", "")  # no stage ran
    assert not out.exists()
    trace = tmp_path / "trace.json"
    res = streamexec("run", "plans/demo.yaml", "--prompt", "x", "--steps", "2", "--trace", str(trace), "-o", str(out),
                     "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    t = json.loads(trace.read_text())
    assert set(t["components"]) == {"text_encoder", "unet", "vae"}
    assert all(op["seconds"] >= 0 and op["peak_rss"] > 0 for op in t["components"]["unet"]["ops"])
