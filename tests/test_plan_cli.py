"""plan.yaml and the CLI around it: `streamexec plan -o`, `streamexec inspect` (table, JSON,
chart), running a saved plan, and the refusals (changed checkpoint, unknown tensor, unsafe YAML,
too small a budget)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import UNET_CONFIGS, randomize, rel_err
from PIL import Image

from streamexec.cli import main
from streamexec.errors import PlanError
from streamexec.runtime.planned import PlannedRun


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**UNET_CONFIGS["sd15-like"]).eval()
    randomize(model, 0)
    path = tmp_path_factory.mktemp("plan") / "unet"
    model.save_pretrained(path)
    return path, model


def _plan(path: Path, out: Path, *extra: str) -> int:
    # the tiny UNet's sample_size is 16 latent cells = 128 px; batch 1 with CFG = UNet batch 2
    return main(["plan", str(path), "-o", str(out), "--height", "128", "--width", "128", *extra])


def test_plan_writes_a_safe_yaml_with_every_op(unet, tmp_path: Path, capsys) -> None:
    path, _ = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out, "--memory-budget", "2G") == 0
    assert "wrote" in capsys.readouterr().out
    d = yaml.safe_load(out.read_text())
    assert d["kind"] == "streamexec-plan" and d["version"] == 1
    files = d["checkpoint"]["files"]
    assert len(files) == 1 and files[0]["size"] > 0 and len(files[0]["header_sha256"]) == 64
    unet_plan = d["components"]["unet"]
    assert unet_plan["inputs"]["sample"]["shape"] == [2, 4, 16, 16]
    ops = unet_plan["ops"]
    lin = next(o for o in ops if o["kind"] == "linear" and o["name"].endswith("attn1.to_q"))
    m, n, k, _ = lin["gemm"][0]
    assert (m, n, k) == (2 * 16 * 16, 32, 32)  # tokens x features: the real matrix sizes
    assert lin["flops"] == 2 * m * n * k
    assert all(o["memory"]["total"] <= d["memory"]["budget_bytes"] for o in ops)
    assert unet_plan["units"][0]["ops"][0] == 0 and unet_plan["units"][-1]["ops"][1] == len(ops) - 1


def test_inspect_table_json_and_chart(unet, tmp_path: Path, capsys) -> None:
    path, _ = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "M x N x K" in table and "down_blocks.0.attentions.0" in table and "512x32x32" in table
    assert main(["inspect", str(out), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    n_ops = len(yaml.safe_load(out.read_text())["components"]["unet"]["ops"])
    assert len(js["ops"]) == n_ops and js["summary"]["components"]["unet"]["ops"] == n_ops
    chart = tmp_path / "mem.png"
    assert main(["inspect", str(out), "--chart", str(chart)]) == 0
    with Image.open(chart) as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_saved_plan_runs_and_matches_diffusers(unet, tmp_path: Path) -> None:
    path, model = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out) == 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 24, generator=g)  # the plan is for CLIP's 77 tokens
    t = torch.tensor([999.0, 17.0])
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=ctx).sample
    run = PlannedRun(out)
    try:
        (y,) = run.components["unet"].run(sample=x.numpy(), timestep=t.numpy(), encoder_hidden_states=ctx.numpy())
    finally:
        run.close()
    assert rel_err(y, ref) <= 1e-4


def test_planned_run_is_guarded_with_the_plans_budget(unet, tmp_path: Path) -> None:
    """PlannedRun runs under the budget guard like ``streamexec run`` and ``load()``: with the plan's
    byte budget, ``strict`` stopping at the op that overshoots, else cutting the run finer."""
    import warnings

    from streamexec.runtime.guard import BudgetExceeded

    path, _ = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out, "--memory-budget", "2G") == 0
    budget = yaml.safe_load(out.read_text())["memory"]["budget_bytes"]
    g = torch.Generator().manual_seed(2)
    feeds = dict(sample=torch.randn(2, 4, 16, 16, generator=g).numpy(), timestep=np.array([999.0, 17.0], np.float32),
                 encoder_hidden_states=torch.randn(2, 77, 24, generator=g).numpy())
    run = PlannedRun(out, strict=True)
    try:
        comp = run.components["unet"]
        assert comp.budget == budget == 2 << 30 and comp.strict
        comp.guard = False
        (ref,) = comp.run(**feeds)
        assert comp.last_executor.budget is None  # guard off: exactly the plan, unchecked
        comp.guard = True
        comp.budget = 1 << 20  # a budget this process is over already: the older peak is reported, not erased
        with pytest.raises(BudgetExceeded, match=r"^strict memory budget: peak RSS .* over the budget 1\.00 MiB "
                                                 r"before \S+ ran "):
            comp.run(**feeds)
        assert comp.last_executor.budget == 1 << 20 and comp.last_executor.strict
    finally:
        run.close()

    run = PlannedRun(out)  # not strict: the guard adapts, warns, and the result is the same
    try:
        comp = run.components["unet"]
        units = len(comp.schedule.units)
        comp.budget = 1 << 20
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (y,) = comp.run(**feeds)
        assert any(str(w.message).startswith("budget guard:") for w in caught)
        assert comp.last_executor.guard_events
        assert len(comp.schedule.units) > units  # the adapted schedule is kept for the next call
    finally:
        run.close()
    assert rel_err(y, torch.from_numpy(ref)) <= 1e-5


def test_plan_for_a_changed_checkpoint_is_refused(unet, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path, _ = unet
    copy = tmp_path / "unet"
    copy.mkdir()
    (copy / "config.json").write_text((path / "config.json").read_text())
    weights = load_file(path / "diffusion_pytorch_model.safetensors")
    save_file(weights, copy / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "p.yaml"
    assert _plan(copy, out) == 0
    PlannedRun(out).close()  # unchanged: accepted
    weights["conv_in.bias"] = weights["conv_in.bias"][:-1].copy()  # a different tensor shape
    save_file(weights, copy / "diffusion_pytorch_model.safetensors")
    with pytest.raises(PlanError, match="changed since the plan was made"):
        PlannedRun(out)


def test_hand_edited_plan_with_unknown_tensor_is_refused(unet, tmp_path: Path) -> None:
    path, _ = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out) == 0
    d = yaml.safe_load(out.read_text())
    d["components"]["unet"]["ops"][1]["weights"]["weight"] = "no.such.tensor"
    out.write_text(yaml.safe_dump(d))
    with pytest.raises(PlanError, match="no.such.tensor"):
        PlannedRun(out)


def test_hand_edited_plan_naming_a_file_outside_the_model_is_refused(unet, tmp_path: Path, capsys) -> None:
    """A plan whose file list points outside the model folder (or whose root is another folder)
    is refused before anything is read from the named path: the plan only names files, the
    checkpoint found under the root is what gets opened and compared."""
    path, _ = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out) == 0
    d = yaml.safe_load(out.read_text())
    d["checkpoint"]["files"][0]["path"] = "../../../../etc/passwd"
    out.write_text(yaml.safe_dump(d))
    with pytest.raises(PlanError, match="made for other files"):
        PlannedRun(out)
    capsys.readouterr()
    assert main(["run", str(out), "--prompt", "x", "-o", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made for other files" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_nan_in_activations_stops_the_run_naming_the_op(unet, tmp_path: Path) -> None:
    """An activation that turns NaN/Inf (here: an input with a NaN) is detected after the op that
    produced it; the run stops with one line naming that op."""
    from streamexec.errors import StreamexecError

    path, _ = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out) == 0
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 16, 16, generator=g).numpy()
    sample[1, 2, 5, 7] = np.inf
    run = PlannedRun(out)
    try:
        comp = run.components["unet"]
        first = comp.graph.ops[next(i for i, op in enumerate(comp.graph.ops) if "sample" in op.inputs)]
        with pytest.raises(StreamexecError) as ei:
            comp.run(sample=sample, timestep=np.array([999.0, 17.0], np.float32),
                     encoder_hidden_states=torch.randn(2, 77, 24, generator=g).numpy())
    finally:
        run.close()
    msg = str(ei.value)
    assert "\n" not in msg and "NaN/Inf" in msg and f"op {first.name} " in msg


def test_unsafe_yaml_is_refused(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "evil.yaml"
    bad.write_text("kind: streamexec-plan\nversion: 1\nx: !!python/object/apply:os.system ['echo owned']\n")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a valid plan" in err[0]
    other = tmp_path / "other.yaml"
    other.write_text("a: 1\n")
    assert main(["inspect", str(other)]) == 2
    assert "not a streamexec plan" in capsys.readouterr().err


def test_too_small_budget_fails_before_writing(unet, tmp_path: Path, capsys) -> None:
    path, _ = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out, "--memory-budget", "10M") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smallest that fits is" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_trace_records_every_op(unet, tmp_path: Path) -> None:
    import streamexec

    path, _ = unet
    m = streamexec.load(path)
    m.trace = True
    x = np.zeros((2, 4, 16, 16), np.float32)
    m(x, 10.0, np.zeros((2, 7, 24), np.float32))
    out = tmp_path / "trace.json"
    m.last_executor.write_trace(out)
    t = json.loads(out.read_text())
    assert len(t["ops"]) == len(m.last_executor.graph.ops)
    first = t["ops"][0]
    assert set(first) >= {"name", "kind", "seconds", "weight_bytes", "rss_after", "peak_rss", "planned_bytes"}
    convs = [o for o in t["ops"] if o["kind"] == "conv2d"]
    assert all(o["weight_bytes"] > 0 and o["rss_after"] > 0 and o["seconds"] >= 0 for o in convs)


def test_plan_and_inspect_a_flux_pipeline(tmp_path: Path, capsys) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    model = tmp_path / "flux"
    res = subprocess.run([sys.executable, str(root / "tools" / "make_checkpoint.py"), "all", str(model), "--preset",
                          "tiny-flux-dev", "--layout", "pipeline", "--dtype", "bf16", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "p.yaml"
    assert main(["plan", str(model), "--height", "128", "--width", "128", "--memory-budget", "1G", "-o", str(out)]) == 0
    d = yaml.safe_load(out.read_text())
    assert set(d["components"]) == {"text_encoder", "text_encoder_2", "transformer", "vae"}
    tr = d["components"]["transformer"]
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    assert tr["inputs"]["hidden_states"]["shape"][1] == (128 // (2 * scale)) ** 2  # packed 2x2 latent tokens
    assert tr["inputs"]["encoder_hidden_states"]["shape"][1] == 512  # dev: T5 max_sequence_length 512
    assert any(o["kind"] == "parallel_mlp" and o.get("gemm") for o in tr["ops"])
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "== transformer" in capsys.readouterr().out


def test_a_saved_plan_is_followed_exactly(unet, tmp_path: Path) -> None:
    """What `streamexec run plan.yaml` does per component: the plan's graph and schedule are used
    as they are when the call has the plan's shapes (here the smallest-footprint schedule)."""
    import streamexec
    from streamexec.planner.plan import graph_from_dict

    path, model = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out, "--memory-budget", "min") == 0
    d = yaml.safe_load(out.read_text())
    graph, schedule, _ = graph_from_dict("unet", d["components"]["unet"])
    m = streamexec.load(path)
    m.use_plan(graph, schedule, d["memory"]["baseline_bytes"] + (64 << 20))
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 24, generator=g), torch.tensor([9.0, 1.0])
    y = m(x.numpy(), t.numpy(), ctx.numpy())
    assert m.last_fit.schedule is schedule and schedule.spill_after  # the plan's own (spilling) schedule
    with torch.no_grad():
        assert rel_err(y, model(x, t, encoder_hidden_states=ctx).sample) <= 1e-4


def test_plan_with_cfg_scale_1_plans_batch_1_and_records_the_sampler(unet, tmp_path: Path, capsys) -> None:
    """`plan --cfg-scale 1 --sampler lcm`: the UNet is planned at batch 1 (no CFG batch) and the sampler
    settings land in the plan's run section for `run`; a combination a run would refuse is refused here,
    before anything is written."""
    path, _ = unet
    out = tmp_path / "p.yaml"
    assert _plan(path, out, "--cfg-scale", "1", "--sampler", "lcm", "--steps", "4") == 0
    d = yaml.safe_load(out.read_text())
    assert d["components"]["unet"]["inputs"]["sample"]["shape"] == [1, 4, 16, 16]
    assert d["run"]["cfg"] is False
    assert {k: d["run"][k] for k in ("sampler", "cfg_scale", "steps")} == {"sampler": "lcm", "cfg_scale": 1.0,
                                                                         "steps": 4}
    assert "timestep_spacing" not in d["run"] and "eta" not in d["run"]
    assert _plan(path, out, "--cfg-scale", "7.5", "--timestep-spacing", "trailing", "--sampler", "euler_a") == 0
    d = yaml.safe_load(out.read_text())
    assert d["components"]["unet"]["inputs"]["sample"]["shape"] == [2, 4, 16, 16]
    assert d["run"]["timestep_spacing"] == "trailing" and d["run"]["sampler"] == "euler_a"
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    for extra, message in [(("--sampler", "lcm", "--timestep-spacing", "trailing"), "distillation schedule"),
                           (("--sampler", "euler", "--eta", "0.3"), "eta applies to the ddim and tcd"),
                           (("--sampler", "ddim", "--timestep-spacing", "sgm_uniform"), "sgm_uniform")]:
        assert _plan(path, bad, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not bad.exists()
