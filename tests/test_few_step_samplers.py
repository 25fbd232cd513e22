"""Few-step sampling (issue 18): ``lcm`` and ``tcd`` against diffusers' ``LCMScheduler`` / ``TCDScheduler``,
the ``timestep_spacing`` override (leading / linspace / trailing against diffusers, ``sgm_uniform`` against
an independent k-diffusion-style computation), and the samplers' ``state_dict`` round trip (issue 13).

The "denoiser" is a fixed numpy function of (x, t) on both sides; each side follows its own trajectory.
The per-step noise is the same on both sides: ours gets it as ``noise=``, diffusers' ``randn_tensor`` in the
scheduler module is replaced to hand out the same arrays in call order.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamexec.configs import REFERENCE_DIR
from streamexec.errors import StreamexecError
from streamexec.pipelines.schedulers import SAMPLERS, SD15_SCHEDULER_CONFIG, make_scheduler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SD15 = json.loads((REFERENCE_DIR / "sd15" / "scheduler" / "scheduler_config.json").read_text())
SHAPE = (1, 4, 8, 8)
TOL = 1e-6
REF = {
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "pndm": diffusers.PNDMScheduler,
    "lcm": diffusers.LCMScheduler,
    "tcd": diffusers.TCDScheduler,
}
NOISE_MODULES = ("scheduling_euler_ancestral_discrete", "scheduling_lcm", "scheduling_tcd", "scheduling_ddim")


def model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet: 0.1 x + sin(t), float32."""
    return (np.float32(0.1) * x + np.float32(np.sin(t))).astype(np.float32)


def feed_noise(monkeypatch: pytest.MonkeyPatch, draws: list[np.ndarray]) -> None:
    it = iter(draws)

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        arr = next(it)
        assert tuple(shape) == arr.shape
        return torch.from_numpy(arr.copy()).to(dtype or torch.float32)

    for module in NOISE_MODULES:
        monkeypatch.setattr(getattr(diffusers.schedulers, module), "randn_tensor", fake_randn)


def max_rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours.astype(np.float64) - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def trajectories(name: str, config: dict, steps: int, monkeypatch, *, eta: float | None = None,
                 spacing: str | None = None, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(ours, diffusers') latents after every step, StableDiffusionPipeline's loop on both sides."""
    ref_config = dict(config) if spacing is None else dict(config, timestep_spacing=spacing)
    ref = REF[name].from_config(ref_config)
    ref.set_timesteps(steps)
    ours = make_scheduler(name, config, steps, eta=eta, spacing=spacing)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(ours.timesteps.dtype))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    draws = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(steps)]
    feed_noise(monkeypatch, draws)
    kw = {} if eta is None else {"eta": eta}
    xt, xo = torch.from_numpy(x * np.float32(ref.init_noise_sigma)), x * np.float32(ours.init_noise_sigma)
    got, want = [], []
    for i, t in enumerate(ref.timesteps):
        mo = torch.from_numpy(model(ref.scale_model_input(xt, t).numpy(), float(t)))
        xt = ref.step(mo, t, xt, return_dict=False, **kw)[0]
        xo = ours.step(model(ours.scale_model_input(xo, i), float(ours.timesteps[i])), i, xo,
                       noise=draws[i] if ours.needs_noise else None)
        want.append(xt.numpy().copy())
        got.append(xo)
    return got, want


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(("name", "eta"), [("lcm", None), ("tcd", None), ("tcd", 0.0), ("tcd", 0.5), ("tcd", 1.0)])
def test_lcm_tcd_trajectories_equal_diffusers(name: str, eta: float | None, prediction: str, steps: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = dict(SD15, prediction_type=prediction)
    got, want = trajectories(name, config, steps, monkeypatch, eta=eta, seed=steps)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == np.float32
        assert max_rel(a, b) <= TOL, f"step {k}: {max_rel(a, b):.2e}"
    # tcd's default eta is diffusers' TCDScheduler.step default (0.3); the trajectory above used it when None


def test_lcm_tcd_timesteps_and_noise_use() -> None:
    """The distillation schedule for every step count diffusers allows; noise drawn only between steps."""
    for name in ("lcm", "tcd"):
        for steps in range(1, 51):
            ref = REF[name].from_config(SD15)
            ref.set_timesteps(steps)
            np.testing.assert_array_equal(make_scheduler(name, SD15, steps).timesteps, ref.timesteps.numpy())
    assert list(make_scheduler("lcm", SD15, 4).timesteps) == [999, 759, 499, 259]
    assert not make_scheduler("lcm", SD15, 1).needs_noise and make_scheduler("lcm", SD15, 2).needs_noise
    assert not make_scheduler("tcd", SD15, 4, eta=0.0).needs_noise and make_scheduler("tcd", SD15, 4).needs_noise
    with pytest.raises(StreamexecError, match="at most 50 steps"):
        make_scheduler("lcm", SD15, 51)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "dpmpp_2m", "pndm"])
def test_spacing_override_equals_diffusers(name: str, spacing: str, steps: int) -> None:
    """``spacing=`` gives the timesteps, sigmas and start sigma of diffusers' ``from_config(timestep_spacing=)``."""
    ref = REF[name].from_config(dict(SD15, timestep_spacing=spacing))
    ref.set_timesteps(steps)
    ours = make_scheduler(name, SD15, steps, spacing=spacing)
    assert ours.params["timestep_spacing"] == spacing
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(ours.timesteps.dtype))
    if ours.sigmas is not None:
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=TOL, atol=0)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=TOL)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim"])
def test_trailing_trajectories_equal_diffusers(name: str, steps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    got, want = trajectories(name, SD15, steps, monkeypatch, spacing="trailing", seed=10 + steps)
    scale = max(float(np.max(np.abs(w))) for w in want)
    for k, (a, b) in enumerate(zip(got, want)):
        err = float(np.max(np.abs(a.astype(np.float64) - b))) / scale
        assert err <= 1e-5, f"step {k}: {err:.2e}"


def k_diffusion_sgm_uniform(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """ComfyUI / stable-diffusion.cpp ``sgm_uniform`` written independently in torch: timesteps
    ``linspace(999, 0, steps + 1)[:-1]``, sigma by k-diffusion's ``DiscreteSchedule.t_to_sigma`` (log-linear
    interpolation of the training sigmas from diffusers' own alphas_cumprod)."""
    ac = diffusers.EulerDiscreteScheduler.from_config(SD15).alphas_cumprod.double()
    log_sigmas = (((1 - ac) / ac) ** 0.5).log()
    t = torch.linspace(999, 0, steps + 1, dtype=torch.float64)[:-1]
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    sigmas = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
    return t.numpy(), torch.cat([sigmas, sigmas.new_zeros(1)]).numpy()


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 20])
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m"])
def test_sgm_uniform_equals_k_diffusion(name: str, steps: int) -> None:
    t, sigmas = k_diffusion_sgm_uniform(steps)
    ours = make_scheduler(name, SD15, steps, spacing="sgm_uniform")
    np.testing.assert_allclose(ours.timesteps, t, rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.sigmas, sigmas, rtol=1e-6, atol=0)
    if name != "dpmpp_2m":
        assert ours.init_noise_sigma == pytest.approx(sigmas[0], rel=1e-6)  # starts at the top sigma, like trailing
    if steps == 4:
        np.testing.assert_array_equal(ours.timesteps, np.array([999, 749.25, 499.5, 249.75], dtype=np.float32))


@pytest.mark.parametrize("name", ["dpmpp_2m", "pndm"])
@pytest.mark.parametrize("cut", [1, 3])
def test_state_dict_round_trip_continues_exactly(name: str, cut: int) -> None:
    """A fresh sampler given ``state_dict()`` after call ``cut`` ends bit for bit where the uninterrupted one does."""
    steps = 6
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal(SHAPE, dtype=np.float32)

    def run(sched, x, calls):
        for i in calls:
            x = sched.step(model(sched.scale_model_input(x, i), float(sched.timesteps[i])), i, x)
        return x

    full = make_scheduler(name, SD15, steps)
    assert full.stateful
    n = len(full.timesteps)
    x_mid = run(full, x0, range(cut + 1))
    state = {k: np.array(v) for k, v in full.state_dict().items()}
    want = run(full, x_mid, range(cut + 1, n))
    fresh = make_scheduler(name, SD15, steps)
    fresh.load_state_dict(state)
    assert np.array_equal(run(fresh, x_mid, range(cut + 1, n)), want)
    broken = dict(state)
    broken.pop(sorted(broken)[0])
    with pytest.raises(StreamexecError, match="sampler state is incomplete") as err:
        make_scheduler(name, SD15, steps).load_state_dict(broken)
    assert "\n" not in str(err.value)


def test_one_step_samplers_have_no_state() -> None:
    for name in ("euler", "euler_a", "ddim", "lcm", "tcd"):
        s = make_scheduler(name, SD15, 4)
        assert not s.stateful and s.state_dict() == {}
        s.load_state_dict({})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "euler", "eta": 0.5}, "eta applies to the ddim and tcd samplers"),
        ({"name": "tcd", "eta": 1.5}, "eta 1.5"),
        ({"name": "lcm", "spacing": "trailing"}, "distillation schedule"),
        ({"name": "ddim", "spacing": "sgm_uniform"}, "sgm_uniform"),
        ({"name": "pndm", "spacing": "sgm_uniform"}, "sgm_uniform"),
        ({"name": "euler", "spacing": "karras"}, "timestep spacing 'karras'"),
        ({"name": "euler", "spacing": "sgm_uniform", "karras": True}, "pick one"),
        ({"name": "dpmpp_2m", "spacing": "sgm_uniform", "karras": True}, "pick one"),
        ({"name": "tcd", "karras": True}, "karras"),
    ],
)
def test_bad_sampler_settings_are_one_line_errors(kwargs: dict, message: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(StreamexecError, match=message) as err:
        make_scheduler(name, SD15_SCHEDULER_CONFIG, 4, **kwargs)
    assert "\n" not in str(err.value)


def test_flux_takes_no_spacing_or_eta() -> None:
    from streamexec.pipelines.schedulers import FLUX_SCHNELL_SCHEDULER_CONFIG

    for kwargs in ({"spacing": "trailing"}, {"eta": 0.3}):
        with pytest.raises(StreamexecError, match="flow-matching"):
            make_scheduler(None, FLUX_SCHNELL_SCHEDULER_CONFIG, 4, **kwargs)
    assert {"lcm", "tcd"} <= set(SAMPLERS)


def test_model_config_naming_lcm_or_tcd_picks_it() -> None:
    """A checkpoint whose scheduler_config says LCMScheduler (LCM-distilled models) gets lcm by default."""
    assert make_scheduler(None, dict(SD15, _class_name="LCMScheduler"), 4).name == "lcm"
    assert make_scheduler(None, dict(SD15, _class_name="TCDScheduler"), 4).name == "tcd"
