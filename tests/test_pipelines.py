"""End-to-end parity of the generation pipelines (tokenize → text encoders → denoise loop → VAE) against
diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline / FluxPipeline, at tiny seeded
configs built here with diffusers/transformers and saved as pipeline folders (model_index.json,
scheduler config, tokenizer files) that both sides load.

Same initial noise on both sides (ours from the seed, handed to diffusers as ``latents=``); the
ancestral sampler's per-step noise and img2img's VAE-posterior / add-noise draws are handed to
diffusers by replacing its ``randn_tensor`` with our seeded draws. Final latents within 1e-3
relative (max|ours - ref| / max|ref|), decoded image within 2/255 per pixel.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import clip_tokenizer, flux_folder, randomize, rel_err, tiny_pipeline_clip, tiny_pipeline_vae

from streamexec.configs import REFERENCE_DIR
from streamexec.errors import StreamexecError
from streamexec.pipelines.generate import (
    FluxPipeline,
    Request,
    SD15Pipeline,
    initial_noise,
    open_pipeline,
    posterior_noise,
    step_noise,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

LAT_TOL = 1e-3
PIX_TOL = 2  # of 255
PROMPT = "a photograph of a lighthouse at dusk, oil painting"
NEGATIVE = "blurry, low quality"
SEED = 1234
SD_SIZE = 16  # pixels: the tiny VAE has 2 blocks (8 latent pixels per side)
SAMPLERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}
MEASURED: dict[str, tuple[float, float]] = {}


def pixel_err(ours: np.ndarray, ref01: np.ndarray) -> float:
    """ours uint8 [H, W, 3] vs diffusers' output_type="np" [1, H, W, 3] in [0, 1]."""
    assert ((ours > 0) & (ours < 255)).mean() > 0.7  # not a saturated picture
    return float(np.abs(ours.astype(np.float64) - ref01[0].astype(np.float64) * 255).max())


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval()
    randomize(unet, 0)
    sched = json.loads((REFERENCE_DIR / "sd15" / "scheduler" / "scheduler_config.json").read_text())
    pipe = StableDiffusionPipeline(vae=tiny_pipeline_vae(4, 1), text_encoder=tiny_pipeline_clip(2),
                                   tokenizer=clip_tokenizer(), unet=unet, scheduler=PNDMScheduler.from_config(sched),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd15"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_ref(sd_folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd_pipe(sd_folder: Path):
    pipe = open_pipeline(sd_folder)
    yield pipe
    pipe.close()


class StepNoise:
    """Replaces diffusers' randn_tensor in a module with our draws: ``draws`` is consumed in order."""

    def __init__(self, draws):
        self.draws = iter(draws)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        arr = next(self.draws)
        assert tuple(shape) == arr.shape, (shape, arr.shape)
        return torch.from_numpy(np.array(arr)).to(dtype or torch.float32)


def ancestral_noises(seed: int, shape: tuple[int, ...], calls: range):
    return (step_noise(seed, i, shape) for i in calls)


def run_diffusers(pipe, call: dict) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(final latents, image in [0, 1], latents after every call) from one diffusers run."""
    seen: list[np.ndarray] = []

    def grab(_pipe, _i, _t, kw):
        seen.append(kw["latents"].detach().numpy().copy())
        return kw

    with torch.no_grad():
        image = pipe(**call, output_type="np", callback_on_step_end=grab, return_dict=False)[0]
    return seen[-1], np.asarray(image), seen


def sd_scheduler(ref_pipe, sampler: str, karras: bool = False):
    """The scheduler swap a diffusers user makes: ``Class.from_config(the checkpoint's scheduler config)``."""
    from diffusers import PNDMScheduler

    base = PNDMScheduler.from_config(ref_pipe.scheduler.config).config
    extra = {"use_karras_sigmas": True} if karras else {}
    return getattr(diffusers, SAMPLERS[sampler]).from_config(base, **extra)


@pytest.mark.parametrize("sampler", [*SAMPLERS, "dpmpp_2m-karras"])
def test_sd15_parity(sd_pipe, sd_ref, sampler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    karras = sampler.endswith("-karras")
    name = sampler.removesuffix("-karras")
    steps = 3
    shape = (1, 4, SD_SIZE // 2, SD_SIZE // 2)
    noise = initial_noise(SEED, shape)
    req = Request(PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps, sampler=name, karras=karras,
                  height=SD_SIZE, width=SD_SIZE)
    progress: list[tuple[str, int, int]] = []
    res = sd_pipe(req, progress=lambda *a: progress.append(a))

    sd_ref.scheduler = sd_scheduler(sd_ref, name, karras)
    if name == "euler_a":
        mod = diffusers.schedulers.scheduling_euler_ancestral_discrete
        monkeypatch.setattr(mod, "randn_tensor", StepNoise(ancestral_noises(SEED, shape, range(steps))))
    lat, img, _ = run_diffusers(sd_ref, dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                                             guidance_scale=7.5, height=SD_SIZE, width=SD_SIZE,
                                             latents=torch.from_numpy(noise.copy())))
    err, pix = rel_err(res.latents, lat), pixel_err(res.image, img)
    MEASURED[f"sd15 {sampler}"] = (err, pix)
    print(f"sd15 {sampler}: latents rel err {err:.2e}, max pixel diff {pix:.2f}/255")
    assert err <= LAT_TOL and pix <= PIX_TOL
    assert res.image.dtype == np.uint8 and res.image.shape == (SD_SIZE, SD_SIZE, 3)
    calls = steps + 1 if name == "pndm" else steps
    assert [p for p in progress if p[0] == "denoise"] == [("denoise", k, calls) for k in range(calls + 1)]
    assert progress[:2] == [("text_encoder", 0, 1), ("text_encoder", 1, 1)]
    assert progress[-2:] == [("vae", 0, 1), ("vae", 1, 1)]
    assert set(res.stage_seconds) == {"text_encoder", "denoise", "vae"}
    assert res.parameters["sampler"] == name and res.parameters["steps"] == steps
    assert res.parameters["karras"] == karras
    weights = {c: sum(t.nbytes for t in sd_pipe.checkpoint.components[c].tensors.values())
               for c in ("unet", "vae", "text_encoder")}
    # every UNet call streams the UNet; the decoder and CLIP once (the VAE's encoder half is never read)
    assert weights["text_encoder"] + calls * weights["unet"] < res.bytes_streamed < sum(weights.values()) + \
        (calls - 1) * weights["unet"]


def test_sd15_default_scheduler_is_the_checkpoints(sd_pipe) -> None:
    req = Request(PROMPT, seed=SEED, steps=2, height=SD_SIZE, width=SD_SIZE, cfg_scale=1.0)
    res = sd_pipe(req)
    assert res.parameters["sampler"] == "pndm" and res.parameters["cfg_scale"] == 1.0
    assert sd_pipe.describe(req) == res.parameters
    assert sd_pipe.default_steps() == 25 and sd_pipe.native_size() == 16 and sd_pipe.kind == "sd15"


def test_sd15_img2img_parity(sd_pipe, sd_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    steps, strength = 4, 0.6
    init = np.random.default_rng(5).integers(0, 256, (SD_SIZE, SD_SIZE, 3), dtype=np.uint8)
    shape = (1, 4, SD_SIZE // 2, SD_SIZE // 2)
    req = Request(PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps, sampler="euler_a", init_image=init,
                  strength=strength)
    progress: list[tuple[str, int, int]] = []
    res = sd_pipe(req, progress=lambda *a: progress.append(a))

    ref = StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = sd_scheduler(ref, "euler_a")
    first = steps - int(steps * strength)
    vae_mod = diffusers.models.autoencoders.vae
    monkeypatch.setattr(vae_mod, "randn_tensor", StepNoise([posterior_noise(SEED, shape)]))
    i2i_mod = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img
    monkeypatch.setattr(i2i_mod, "randn_tensor", StepNoise([initial_noise(SEED, shape)]))
    anc_mod = diffusers.schedulers.scheduling_euler_ancestral_discrete
    monkeypatch.setattr(anc_mod, "randn_tensor", StepNoise(ancestral_noises(SEED, shape, range(first, steps))))
    lat, img, _ = run_diffusers(ref, dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(init),
                                          strength=strength, num_inference_steps=steps, guidance_scale=7.5))
    err, pix = rel_err(res.latents, lat), pixel_err(res.image, img)
    MEASURED["sd15 img2img euler_a"] = (err, pix)
    print(f"sd15 img2img euler_a: latents rel err {err:.2e}, max pixel diff {pix:.2f}/255")
    assert err <= LAT_TOL and pix <= PIX_TOL
    assert [p for p in progress if p[0] == "denoise"][0] == ("denoise", 0, steps - first)
    assert ("vae_encode", 1, 1) in progress and res.parameters["strength"] == strength


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "pndm", "lcm", "tcd"])
def test_sd15_resume_gives_the_same_latents(sd_pipe, sampler: str) -> None:
    req = Request(PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=4, sampler=sampler, height=SD_SIZE,
                  width=SD_SIZE)
    saved: dict[int, tuple[np.ndarray, dict]] = {}
    full = sd_pipe(req, on_step=lambda i, x: saved.__setitem__(i, (x.copy(), sd_pipe.resume_state())))
    k = 1  # interrupted after call 1
    latents, state = saved[k]
    steps_after: list[int] = []
    progress: list[tuple[str, int, int]] = []
    resumed = sd_pipe(req, on_step=lambda i, x: steps_after.append(i), progress=lambda *a: progress.append(a),
                      start_step=k + 1, start_latents=latents, start_state=state)
    assert np.array_equal(resumed.latents, full.latents) and np.array_equal(resumed.image, full.image)
    assert steps_after == list(range(k + 1, len(saved)))
    assert [p for p in progress if p[0] == "denoise"][0] == ("denoise", k + 1, len(saved))
    if sampler in ("dpmpp_2m", "pndm"):  # multistep: the history is needed
        with pytest.raises(StreamexecError, match="start_state"):
            sd_pipe(req, start_step=k + 1, start_latents=latents)


def test_sd15_same_seed_same_bits_and_request_errors(sd_pipe) -> None:
    req = Request(PROMPT, seed=3, steps=2, sampler="euler_a", height=SD_SIZE, width=SD_SIZE)
    a, b = sd_pipe(req), sd_pipe(req)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.latents, b.latents)
    assert not np.array_equal(sd_pipe(Request(PROMPT, seed=4, steps=2, sampler="euler_a", height=SD_SIZE,
                                              width=SD_SIZE)).latents, a.latents)
    for bad, match in [(dict(height=12), "multiple of 8"), (dict(guidance=3.5), "cfg_scale"),
                       (dict(latents_in=np.zeros((1, 4, 3, 3), np.float32)), "latents_in"),
                       (dict(sampler="heun"), "unknown sampler"), (dict(seed=-1), "seed")]:
        with pytest.raises(StreamexecError, match=match):
            sd_pipe(Request(PROMPT, **{"steps": 2, "height": SD_SIZE, "width": SD_SIZE, **bad}))


def test_sd15_long_prompt_warns(sd_pipe) -> None:
    from streamexec.pipelines.tokenizers import PromptTruncatedWarning

    with pytest.warns(PromptTruncatedWarning, match="CLIP takes 77 tokens"):
        sd_pipe(Request(" ".join([PROMPT] * 20), steps=1, sampler="euler", height=SD_SIZE, width=SD_SIZE))


@pytest.mark.parametrize(("sampler", "cls", "eta"), [("lcm", "LCMScheduler", None), ("tcd", "TCDScheduler", 0.3)])
def test_sd15_few_step_cfg1_parity_at_batch_1(sd_pipe, sd_ref, sampler: str, cls: str, eta: float | None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """LCM/TCD with --cfg-scale 1 as an LCM-LoRA user runs diffusers (StableDiffusionPipeline, scheduler
    swapped, guidance_scale=1): the UNet runs once per step at batch 1 and the negative prompt is never
    encoded; fresh noise between steps is step_noise(seed, i), handed to diffusers too."""
    steps = 4
    shape = (1, 4, SD_SIZE // 2, SD_SIZE // 2)
    calls: list[tuple[str, tuple[int, ...]]] = []
    real_call = sd_pipe._call

    def spy(name, *args, **kwargs):
        first = kwargs.get("sample", kwargs.get("input_ids", args[0] if args else None))
        calls.append((name, tuple(np.shape(first))))
        return real_call(name, *args, **kwargs)

    monkeypatch.setattr(sd_pipe, "_call", spy)
    req = Request(PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps, sampler=sampler, cfg_scale=1.0,
                  eta=eta, height=SD_SIZE, width=SD_SIZE)
    res = sd_pipe(req)
    assert calls[0] == ("text_encoder", (1, 77))  # the prompt only: no negative prompt row
    assert [c for c in calls if c[0] == "unet"] == [("unet", shape)] * steps  # once per step, batch 1
    assert sd_pipe.models["unet"].last_executor.graph.inputs["sample"][0] == 1  # planned and run at batch 1
    assert res.parameters["sampler"] == sampler and res.parameters["cfg_scale"] == 1.0
    assert res.parameters.get("eta") == eta

    sd_ref.scheduler = getattr(diffusers, cls).from_config(sd_ref.scheduler.config)
    mod = diffusers.schedulers.scheduling_lcm if sampler == "lcm" else diffusers.schedulers.scheduling_tcd
    monkeypatch.setattr(mod, "randn_tensor", StepNoise(ancestral_noises(SEED, shape, range(steps - 1))))
    extra = {} if eta is None else {"eta": eta}
    lat, img, _ = run_diffusers(sd_ref, dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                                             guidance_scale=1.0, height=SD_SIZE, width=SD_SIZE,
                                             latents=torch.from_numpy(initial_noise(SEED, shape)), **extra))
    err, pix = rel_err(res.latents, lat), pixel_err(res.image, img)
    MEASURED[f"sd15 {sampler} cfg 1"] = (err, pix)
    print(f"sd15 {sampler} cfg 1: latents rel err {err:.2e}, max pixel diff {pix:.2f}/255")
    assert err <= LAT_TOL and pix <= PIX_TOL


def test_sd15_cli_sampler_settings_from_plan_and_flags(sd_folder: Path, tmp_path: Path) -> None:
    """`plan --sampler lcm --cfg-scale 1` records the settings; `run plan.yaml` uses them, and its own
    --sampler/--eta/--timestep-spacing flags win; the PNG's parameters say what ran."""
    from PIL import Image

    from streamexec.cli import main

    plan, png = tmp_path / "p.yaml", tmp_path / "a.png"
    size = ["--height", str(SD_SIZE), "--width", str(SD_SIZE)]
    assert main(["plan", str(sd_folder), "--sampler", "lcm", "--cfg-scale", "1", "--steps", "2", *size,
                 "-o", str(plan)]) == 0
    assert main(["run", str(plan), "--prompt", PROMPT, "--quiet", "-o", str(png)]) == 0
    with Image.open(png) as im:
        text = im.text["parameters"]
    assert "Steps: 2, Sampler: lcm, CFG scale: 1.0" in text and "Eta" not in text
    assert main(["run", str(plan), "--prompt", PROMPT, "--quiet", "--sampler", "tcd", "--eta", "0.5",
                 "-o", str(png)]) == 0
    with Image.open(png) as im:
        assert "Sampler: tcd, Eta: 0.5, CFG scale: 1.0" in im.text["parameters"]
    assert main(["run", str(plan), "--prompt", PROMPT, "--quiet", "--sampler", "euler_a", "--timestep-spacing",
                 "trailing", "-o", str(png)]) == 0
    with Image.open(png) as im:
        assert "Sampler: euler_a, Timestep spacing: trailing, CFG scale: 1.0" in im.text["parameters"]
    png.unlink()
    assert main(["run", str(plan), "--prompt", PROMPT, "--quiet", "--timestep-spacing", "trailing",
                 "-o", str(png)]) == 2  # lcm (from the plan) takes no spacing: one line, nothing written
    assert not png.exists()


# ---------------------------------------------------------------------------------------------- FLUX

FLUX_SIZE = 16  # pixels (tiny VAE: 2 latent pixels per image pixel, 2x2 packing: 16 tokens)
MSL = 48


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    return {"schnell": flux_folder(root, False), "dev": flux_folder(root, True)}


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_flux_parity(flux_folders: dict[str, Path], variant: str) -> None:
    from diffusers import FluxPipeline as RefFlux

    steps = 3 if variant == "schnell" else 4
    packed = (1, (FLUX_SIZE // 4) ** 2, 16)
    latents_in = np.random.default_rng(9).standard_normal(packed, dtype=np.float32)
    req = Request(PROMPT, seed=SEED, steps=steps, height=FLUX_SIZE, width=FLUX_SIZE, max_sequence_length=MSL,
                  latents_in=latents_in, guidance=4.0 if variant == "dev" else None)
    progress: list[tuple[str, int, int]] = []
    with open_pipeline(flux_folders[variant]) as pipe:
        assert isinstance(pipe, FluxPipeline) and pipe.kind == "flux"
        assert pipe.default_steps() == (28 if variant == "dev" else 4)
        res = pipe(req, progress=lambda *a: progress.append(a))
        assert pipe.describe(req) == res.parameters
    ref = RefFlux.from_pretrained(flux_folders[variant])
    lat, img, _ = run_diffusers(ref, dict(prompt=PROMPT, num_inference_steps=steps, height=FLUX_SIZE, width=FLUX_SIZE,
                                          guidance_scale=4.0, max_sequence_length=MSL,
                                          latents=torch.from_numpy(latents_in.copy())))
    err, pix = rel_err(res.latents, lat), pixel_err(res.image, img)
    MEASURED[f"flux {variant}"] = (err, pix)
    print(f"flux {variant}: latents rel err {err:.2e}, max pixel diff {pix:.2f}/255")
    assert err <= LAT_TOL and pix <= PIX_TOL
    assert res.latents.shape == packed and res.image.shape == (FLUX_SIZE, FLUX_SIZE, 3)
    assert set(res.stage_seconds) == {"text_encoder", "text_encoder_2", "denoise", "vae"}
    assert [p for p in progress if p[0] == "denoise"] == [("denoise", k, steps) for k in range(steps + 1)]
    assert ("text_encoder_2", 1, 1) in progress
    assert res.parameters["kind"] == f"flux-{variant}" and res.parameters["max_sequence_length"] == MSL
    assert res.parameters.get("guidance") == (4.0 if variant == "dev" else None)


def test_flux_seeded_noise_and_resume(flux_folders: dict[str, Path]) -> None:
    """Without latents_in the noise is initial_noise(seed) of [1, C, h, w], packed; resume is exact."""
    from streamexec.pipelines.flux import pack_latents

    with open_pipeline(flux_folders["schnell"]) as pipe:
        base = Request(PROMPT, seed=SEED, steps=3, height=FLUX_SIZE, width=FLUX_SIZE, max_sequence_length=MSL)
        saved: dict[int, np.ndarray] = {}
        a = pipe(base, on_step=lambda i, x: saved.__setitem__(i, x.copy()))
        noise = pack_latents(initial_noise(SEED, (1, 4, FLUX_SIZE // 2, FLUX_SIZE // 2)))
        b = pipe(Request(**{**base.__dict__, "latents_in": noise}))
        assert np.array_equal(a.latents, b.latents)
        resumed = pipe(base, start_step=2, start_latents=saved[1])
        assert np.array_equal(resumed.latents, a.latents)
        with pytest.raises(StreamexecError, match="negative prompt"):
            pipe(Request(PROMPT, negative_prompt="x", steps=1))
        with pytest.raises(StreamexecError, match="no guidance embedder"):
            pipe(Request(PROMPT, guidance=3.5, steps=1))


def test_flux_missing_tokenizer_is_one_line_error(flux_folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "no-t5-tokenizer"
    shutil.copytree(flux_folders["schnell"], folder)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(StreamexecError) as err:
        open_pipeline(folder)
    msg = str(err.value)
    assert "\n" not in msg and "--tokenizer" in msg and "T5" in msg
    # --tokenizer pointing at the T5 files works (CLIP then comes from the model folder)
    with open_pipeline(folder, tokenizer=flux_folders["schnell"] / "tokenizer_2") as pipe:
        assert pipe.t5_tokenizer.eos_id == 1


def test_open_errors(sd_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(StreamexecError, match="single component folder"):
        open_pipeline(sd_folder / "unet")
    with pytest.raises(StreamexecError):
        open_pipeline(tmp_path / "nothing-here")
    p = open_pipeline(sd_folder, memory_budget="4G")
    assert isinstance(p, SD15Pipeline) and p.memory_budget == 4 << 30
    p.close()
    # no tokenizer/ and no scheduler/ (as single files): the shipped SD 1.5 CLIP BPE and scheduler config
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(sd_folder, bare, ignore=shutil.ignore_patterns("tokenizer", "scheduler"))
    with open_pipeline(bare) as p:
        assert p.tokenizer.folder == REFERENCE_DIR / "sd15" / "tokenizer"
        assert p.scheduler_config["_class_name"] == "PNDMScheduler"


def test_measured_table() -> None:
    """Print what the parity tests measured (run with -s to see it)."""
    with warnings.catch_warnings():
        for name, (err, pix) in sorted(MEASURED.items()):
            print(f"{name:24s} latents {err:.1e}  pixels {pix:.2f}/255")
