"""Memory budgets: schedules that fit, results that do not change, and peak RSS measured by the OS.

- Tight budgets (``baseline=0`` so that tiny models feel them; ``"smallest"`` = every choice at
  its smallest): the planner must chunk rows, tile attention, band convolutions, split units, spill
  activations and stream them back — and the outputs must match diffusers/transformers to the
  same tolerance as the unbounded run (1e-4 relative).
- Too small a budget fails before computing anything and names the smallest that fits, which
  then works.
- A subprocess runs a 312M-parameter UNet (624 MB of fp16 weights) under a 300 MiB budget; its
  peak RSS measured from outside (``tests/outside_memory.py``: the parent samples the child's
  /proc status every few ms, not the planner's arithmetic nor a VmHWM the child could reset)
  stays under the budget with no guard warning, and in a second, traced call every op's peak
  RSS window stays under what the plan charged for it. The same for a VAE decode with feature
  maps on disk and a FLUX slice.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FLUX_BUDGET, FLUX_MID, UNET_CONFIGS, VAE_CONFIGS, randomize, rel_err
from outside_memory import assert_within, guard_warnings, run_measured

import streamexec
from streamexec.errors import BudgetError

TOL = 1e-4
MiB = 1 << 20


def _schedule_features(m) -> dict:
    s = m.last_fit.schedule
    params = [p for p in s.op_params.values()]
    return {
        "spills": sum(len(v) for v in s.spill_after.values()),
        "row_chunk": any("row_chunk" in p for p in params),
        "tiles": any("q_tile" in p for p in params),
        "bands": any("band_rows" in p for p in params),
        "readahead": "readahead" in (s.prefetch or []),
        "streamed": sum(len(v) for v in s.stream_inputs.values()),
        "units": len(s.units),
    }


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> tuple[Path, object]:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**UNET_CONFIGS["sd15-like"]).eval()
    randomize(model, 0)
    path = tmp_path_factory.mktemp("budget") / "unet"
    model.save_pretrained(path)
    return path, model


def _unet_inputs(cfg: dict):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    ctx = torch.randn(2, 7, cfg["cross_attention_dim"], generator=g)
    t = torch.tensor([999.0, 17.0])
    return x, t, ctx


def test_unet_smallest_budget_chunks_tiles_bands_spills_and_matches(unet_dir, tmp_path: Path) -> None:
    path, model = unet_dir
    x, t, ctx = _unet_inputs(UNET_CONFIGS["sd15-like"])
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=ctx).sample
    free = streamexec.load(path, baseline=0)
    unbounded = free(x.numpy(), t.numpy(), ctx.numpy())
    smallest = free.last_fit.min_budget
    assert smallest < free.last_fit.peak

    scratch = tmp_path / "scratch"
    # "smallest": every choice at its smallest (every out-of-core path of the kernels)
    tight = streamexec.load(path, baseline=0, memory_budget="smallest", scratch_dir=str(scratch))
    ours = tight(x.numpy(), t.numpy(), ctx.numpy())
    f = _schedule_features(tight)
    assert f["spills"] > 0 and f["row_chunk"] and f["tiles"] and f["bands"] and f["readahead"], f
    assert f["streamed"] > 0 and f["units"] > len(free.last_fit.schedule.units)
    assert tight.last_fit.peak >= smallest  # the smallest budget is never above the smallest walk's peak
    assert tight.last_executor.spill_bytes_written > 0
    assert rel_err(ours, ref) <= TOL
    assert rel_err(ours, unbounded) <= TOL
    assert list(scratch.iterdir()) == []  # the spill folder is gone after the run
    # a byte budget equal to the smallest: the fitter finds its own schedule inside it
    at_min = streamexec.load(path, baseline=0, memory_budget=smallest)
    assert rel_err(at_min(x.numpy(), t.numpy(), ctx.numpy()), ref) <= TOL
    assert at_min.last_fit.peak <= smallest and _schedule_features(at_min)["spills"] > 0


def test_unet_budget_between_smallest_and_unbounded(unet_dir) -> None:
    path, model = unet_dir
    x, t, ctx = _unet_inputs(UNET_CONFIGS["sd15-like"])
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=ctx).sample
    free = streamexec.load(path, baseline=0)
    free(x.numpy(), t.numpy(), ctx.numpy())
    lo, hi = free.last_fit.min_budget, free.last_fit.peak
    for frac in (0.3, 0.7):
        budget = int(lo + frac * (hi - lo))
        m = streamexec.load(path, baseline=0, memory_budget=budget)
        ours = m(x.numpy(), t.numpy(), ctx.numpy())
        assert m.last_fit.peak <= budget
        assert rel_err(ours, ref) <= TOL


def test_too_small_budget_names_the_smallest_that_fits(unet_dir) -> None:
    path, _ = unet_dir
    x, t, ctx = _unet_inputs(UNET_CONFIGS["sd15-like"])
    m = streamexec.load(path, baseline=0, memory_budget="1M")
    with pytest.raises(BudgetError) as e:
        m(x.numpy(), t.numpy(), ctx.numpy())
    assert m.last_executor is None  # nothing ran
    msg = str(e.value)
    found = re.search(r"smallest that fits is ([\d.]+) MiB", msg)
    assert found, msg
    smallest = int(float(found.group(1)) * MiB)
    ok = streamexec.load(path, baseline=0, memory_budget=smallest)
    ok(x.numpy(), t.numpy(), ctx.numpy())
    assert ok.last_fit.peak <= smallest


def test_vae_and_clip_at_smallest_budget_match(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = VAE_CONFIGS["sd-4ch-quant"]
    n = len(cfg["block_out_channels"])
    vae_model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                              up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=8,
                              **cfg).eval()
    randomize(vae_model, 3)
    vae_model.save_pretrained(tmp_path / "vae")
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = vae_model.decode(z).sample
    free = streamexec.load(tmp_path / "vae", baseline=0)
    free.decode(z.numpy())
    tight = streamexec.load(tmp_path / "vae", baseline=0, memory_budget="smallest")
    ours = tight.decode(z.numpy())
    f = _schedule_features(tight)
    assert f["spills"] > 0 and f["bands"], f
    assert rel_err(ours, ref) <= TOL

    tcfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=16, eos_token_id=2)
    clip = CLIPTextModel(tcfg).eval()
    randomize(clip, 2)
    clip.save_pretrained(tmp_path / "te")
    ids = torch.tensor([[0, 5, 17, 98, 3, 3], [0, 40, 98, 3, 3, 3]])
    with torch.no_grad():
        cref = clip(ids)
    free = streamexec.load(tmp_path / "te", baseline=0)
    free(ids.numpy())
    tight = streamexec.load(tmp_path / "te", baseline=0, memory_budget="smallest")
    h, pooled = tight(ids.numpy())
    assert rel_err(h, cref.last_hidden_state) <= TOL
    assert rel_err(pooled, cref.pooler_output) <= TOL


# -- the OS's word: a subprocess under a budget well below the checkpoint size --------------------
MID_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 640, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
)
BUDGET = 300 * MiB

RUNNER = r"""
import json, sys, time
import numpy as np
import streamexec
path, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
d = np.load(out + ".in.npz")
m = streamexec.load(path, memory_budget=budget)
y = m(d["x"], d["t"], d["c"])
np.save(out, y)
mark = time.monotonic()  # the untraced call is over; the traced one (VmHWM reset per op) starts after a pause
time.sleep(0.1)
m.trace = True
m(d["x"], d["t"], d["c"])
recs = m.last_executor.records
print(json.dumps({
    "mark": mark, "baseline": m.last_fit.baseline, "planned_peak": m.last_fit.peak,
    "windows": [[r.name, r.peak_rss, r.planned_bytes] for r in recs],
    "spill_written": m.last_executor.spill_bytes_written,
}))
"""


def test_subprocess_peak_rss_stays_under_budget(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**MID_UNET).eval()
    model.half().save_pretrained(tmp_path / "unet")  # fp16 weights, as users have them
    model = model.float()  # the reference runs exactly the fp16-rounded weights in f32
    ckpt_bytes = (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert ckpt_bytes > 1.5 * BUDGET  # the budget is well under the checkpoint

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    c = torch.randn(2, 7, 256, generator=g)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=c).sample
    out = tmp_path / "y.npy"
    np.savez(str(out) + ".in.npz", x=x.numpy(), t=t.numpy(), c=c.numpy())
    res = run_measured([sys.executable, "-c", RUNNER, str(tmp_path / "unet"), str(BUDGET), str(out)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not guard_warnings(res.stderr), res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    peak, reset = res.window(0, info["mark"] + 0.08)  # the untraced call, from outside
    closest = min(q - p for _, p, q in info["windows"])
    print(f"outside peak {peak / MiB:.1f} MiB, budget {BUDGET / MiB:.0f} MiB, planned peak "
          f"{info['planned_peak'] / MiB:.1f} MiB, baseline {info['baseline'] / MiB:.1f} MiB, checkpoint "
          f"{ckpt_bytes / MiB:.0f} MiB, closest op window {closest / MiB:.1f} MiB under its plan; whole child "
          f"with the traced call: {res.describe()}")
    assert not reset, "VmHWM went down before --trace's windows: something reset it"
    assert peak <= BUDGET, (peak / MiB, info["planned_peak"] / MiB, info["baseline"] / MiB)
    assert res.peak <= BUDGET  # the traced call too (its windows reset VmHWM: the samples still see RSS)
    assert rel_err(np.load(out), ref) <= TOL
    if all(p == 0 for _, p, _ in info["windows"]):
        pytest.skip("/proc/self/clear_refs is not writable here: no per-op peak windows to check")
    over = [(n, p / MiB, q / MiB) for n, p, q in info["windows"] if p > q]
    assert not over, over[:5]


def test_flux_and_t5_at_smallest_budget_match(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel
    from helpers import FLUX_CONFIGS, flux_inputs, tiny_t5

    cfg = FLUX_CONFIGS["schnell-like"]
    model = FluxTransformer2DModel(**cfg).eval()
    randomize(model, 0)
    model.save_pretrained(tmp_path / "transformer")
    inputs = flux_inputs(cfg, 2, 6, 8, 5, seed=1)
    with torch.no_grad():
        ref = model(**inputs).sample
    feeds = {k: None if v is None else v.numpy() for k, v in inputs.items()}
    free = streamexec.load(tmp_path / "transformer", baseline=0)
    free(**feeds)
    tight = streamexec.load(tmp_path / "transformer", baseline=0, memory_budget="smallest")
    ours = tight(**feeds)
    f = _schedule_features(tight)
    assert f["spills"] > 0 and f["row_chunk"] and f["readahead"], f  # 48-token attention: one tile already
    assert rel_err(ours, ref) <= 1e-5

    t5 = tiny_t5("gated-gelu", seed=8)
    t5.save_pretrained(tmp_path / "t5")
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        tref = t5(ids).last_hidden_state
    free = streamexec.load(tmp_path / "t5", baseline=0)
    free(input_ids=ids.numpy())
    tight = streamexec.load(tmp_path / "t5", baseline=0, memory_budget="smallest")
    assert rel_err(tight(input_ids=ids.numpy()), tref) <= TOL
    assert _schedule_features(tight)["spills"] > 0


VAE_WIDE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(64, 128, 256, 256),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)

VAE_RUNNER = r"""
import json, sys
import numpy as np
import streamexec
path, budget, out = sys.argv[1], sys.argv[2], sys.argv[3]
z = np.load(out + ".in.npy")
m = streamexec.load(path, memory_budget=budget, scratch_dir=sys.argv[4])
y = m.decode(z)
np.save(out, y)
s = m.last_fit.schedule
print(json.dumps({"baseline": m.last_fit.baseline, "peak": m.last_fit.peak,
                  "budget": m.last_fit.budget, "disk_out": len(s.disk_out)}))
"""


def test_subprocess_vae_decode_with_feature_maps_on_disk(tmp_path: Path) -> None:
    """512² decode whose 128 MiB feature maps cannot fit next to the process: the smallest budget
    keeps them on disk, band by band; VmHWM stays under it and the image matches diffusers."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**VAE_WIDE).eval()
    randomize(model, 5)
    model.save_pretrained(tmp_path / "vae")
    z = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model.decode(z).sample
    out = tmp_path / "img.npy"
    np.save(str(out) + ".in.npy", z.numpy())
    scratch = tmp_path / "scratch"
    res = run_measured([sys.executable, "-c", VAE_RUNNER, str(tmp_path / "vae"), "min", str(out), str(scratch)],
                       timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"VAE 512² decode: {res.describe()}, planned {info['peak'] / MiB:.1f} MiB, "
          f"baseline {info['baseline'] / MiB:.1f} MiB, {info['disk_out']} ops wrote to disk")
    biggest = 128 * 512 * 512 * 4  # the 128-channel map at 512²
    assert info["budget"] - info["baseline"] < biggest  # one such map cannot be in RAM
    assert info["disk_out"] > 0
    assert_within(res, info["budget"], "VAE 512² decode at its smallest budget")
    assert rel_err(np.load(out), ref) <= TOL
    assert list(scratch.iterdir()) == []



FLUX_RUNNER = r"""
import json, sys
import numpy as np
import streamexec
path, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
d = dict(np.load(out + ".in.npz"))
m = streamexec.load(path, memory_budget=budget)
y = m(**d)
np.save(out, y)
print(json.dumps({"baseline": m.last_fit.baseline, "planned_peak": m.last_fit.peak,
                  "units": len(m.last_fit.schedule.units), "ops": len(m.last_executor.graph.ops)}))
"""


def test_subprocess_flux_peak_rss_stays_under_budget(tmp_path: Path) -> None:
    """A FLUX-dev-like transformer at half FLUX.1's width (12 heads of 128 = 1536), 1 double + 4
    single blocks, bf16 weights (462 MiB) under a 300 MiB budget: VmHWM from /proc stays under
    it, and the output matches diffusers on the same bf16-rounded weights."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_MID).eval()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "transformer")
    model = model.float()
    ckpt_bytes = sum(f.stat().st_size for f in (tmp_path / "transformer").glob("*.safetensors"))
    assert ckpt_bytes > 1.4 * FLUX_BUDGET

    g = torch.Generator().manual_seed(1)
    ni, nt = 16 * 16, 64
    inputs = dict(
        hidden_states=torch.randn(1, ni, 64, generator=g), encoder_hidden_states=torch.randn(1, nt, 1024, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.tensor([0.7]),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 16, 16, "cpu", torch.float32), txt_ids=torch.zeros(nt, 3),
        guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        ref = model(**inputs).sample
    out = tmp_path / "y.npy"
    np.savez(str(out) + ".in.npz", **{k: v.numpy() for k, v in inputs.items()})
    res = run_measured([sys.executable, "-c", FLUX_RUNNER, str(tmp_path / "transformer"), str(FLUX_BUDGET), str(out)],
                       timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"FLUX slice: {res.describe()}, budget {FLUX_BUDGET / MiB:.0f} MiB, planned "
          f"{info['planned_peak'] / MiB:.1f} MiB, checkpoint {ckpt_bytes / MiB:.0f} MiB, {info['units']} units")
    assert_within(res, FLUX_BUDGET, "FLUX slice")
    assert rel_err(np.load(out), ref) <= TOL
