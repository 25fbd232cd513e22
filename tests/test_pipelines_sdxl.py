"""End-to-end parity of SDXL (``SDXLPipeline`` vs diffusers' ``StableDiffusionXLPipeline``) and SD 2.x
v-prediction (``SD15Pipeline`` vs ``StableDiffusionPipeline``) at tiny seeded configs saved as pipeline
folders both sides load; same initial noise (ours from the seed, handed to diffusers as ``latents=``).
Final latents within 1e-3 relative, decoded image within 2/255 per pixel (as tests/test_pipelines.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, clip_tokenizer, randomize, rel_err, tiny_clip, tiny_pipeline_clip, tiny_pipeline_vae
from PIL import Image

from streamexec.configs import REFERENCE_DIR
from streamexec.pipelines.generate import (
    Request,
    SD15Pipeline,
    SDXLPipeline,
    initial_noise,
    open_pipeline,
    step_noise,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

LAT_TOL = 1e-3
PIX_TOL = 2  # of 255
PROMPT = "a photograph of a lighthouse at dusk, oil painting"
NEGATIVE = "blurry, low quality"
SEED = 99
SIZE = 16  # pixels: the tiny VAE has 2 blocks


def _clip_cfg(model: str, part: str, **over) -> dict:
    cfg = json.loads((REFERENCE_DIR / model / part / "config.json").read_text())
    for k in ("_name_or_path", "architectures", "torch_dtype", "transformers_version"):
        cfg.pop(k, None)
    return {**cfg, **over}


def _bang_tokenizer():
    """SD 2.x / SDXL tokenizer_2: CLIP's BPE padding with "!"."""
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(REFERENCE_DIR / "sd15" / "tokenizer", pad_token="!")


def _run(pipe, call: dict) -> tuple[np.ndarray, np.ndarray]:
    seen: list[np.ndarray] = []

    def grab(_pipe, _i, _t, kw):
        seen.append(kw["latents"].detach().numpy().copy())
        return kw

    with torch.no_grad():
        image = pipe(**call, output_type="np", callback_on_step_end=grab, return_dict=False)[0]
    return seen[-1], np.asarray(image)


def _check(res, lat: np.ndarray, img: np.ndarray, what: str) -> None:
    err = rel_err(res.latents, lat)
    assert ((res.image > 0) & (res.image < 255)).mean() > 0.7  # not a saturated picture
    pix = float(np.abs(res.image.astype(np.float64) - img[0].astype(np.float64) * 255).max())
    print(f"{what}: latents rel err {err:.2e}, max pixel diff {pix:.2f}/255")
    assert err <= LAT_TOL and pix <= PIX_TOL


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_clip_cfg(
        "sdxl", "text_encoder_2", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        projection_dim=24))).eval()
    randomize(te2, 21)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8).eval()
    randomize(unet, 22)
    sched = json.loads((REFERENCE_DIR / "sdxl" / "scheduler" / "scheduler_config.json").read_text())
    pipe = StableDiffusionXLPipeline(
        vae=tiny_pipeline_vae(4, 23, scaling_factor=0.13025), text_encoder=tiny_pipeline_clip(24),
        text_encoder_2=te2, tokenizer=clip_tokenizer(), tokenizer_2=_bang_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(sched), force_zeros_for_empty_prompt=True)
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("negative", [NEGATIVE, None])
def test_sdxl_parity(sdxl_folder: Path, negative: str | None) -> None:
    from diffusers import StableDiffusionXLPipeline

    steps = 3
    with open_pipeline(sdxl_folder) as pipe:
        assert isinstance(pipe, SDXLPipeline)
        res = pipe(Request(PROMPT, negative_prompt=negative or "", seed=SEED, steps=steps, height=SIZE, width=SIZE))
    assert res.parameters["cfg_scale"] == 5.0 and res.parameters["kind"] == "sdxl"
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    noise = initial_noise(SEED, (1, 4, SIZE // 2, SIZE // 2))
    lat, img = _run(ref, dict(prompt=PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=5.0,
                              height=SIZE, width=SIZE, latents=torch.from_numpy(noise.copy())))
    _check(res, lat, img, f"sdxl negative={negative!r}")


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    te = tiny_clip(31, randomized=True, **_clip_cfg("sd21", "text_encoder", hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=2))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
        upcast_attention=True).eval()
    randomize(unet, 32)
    sched = json.loads((REFERENCE_DIR / "sd21" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    pipe = StableDiffusionPipeline(vae=tiny_pipeline_vae(4, 33), text_encoder=te, tokenizer=_bang_tokenizer(),
                                   unet=unet, scheduler=DDIMScheduler.from_config(sched), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd2") / "tiny-sd21"
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_sd2_v_prediction_parity(sd2_folder: Path, sampler: str) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    steps = 3
    with open_pipeline(sd2_folder) as pipe:
        assert isinstance(pipe, SD15Pipeline) and not isinstance(pipe, SDXLPipeline)
        res = pipe(Request(PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps, sampler=sampler, height=SIZE,
                           width=SIZE))
    ref = StableDiffusionPipeline.from_pretrained(sd2_folder, safety_checker=None, requires_safety_checker=False)
    if sampler == "euler":
        ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    noise = initial_noise(SEED, (1, 4, SIZE // 2, SIZE // 2))
    lat, img = _run(ref, dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                              height=SIZE, width=SIZE, latents=torch.from_numpy(noise.copy())))
    _check(res, lat, img, f"sd2 v-prediction {sampler}")


def test_sdxl_turbo_template_matches_diffusers(sdxl_folder: Path, env: dict, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``plans/sdxl-turbo-512.yaml`` (1 step, guidance 0, Euler ancestral, trailing timesteps) run by
    the CLI gives diffusers' picture for the model card's call (``num_inference_steps=1,
    guidance_scale=0.0``) with that scheduler; the ancestral noise is handed to diffusers."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    out = tmp_path / "turbo.png"
    res = subprocess.run([sys.executable, "-m", "streamexec", "run", "plans/sdxl-turbo-512.yaml", "--model",
                          str(sdxl_folder), "--prompt", PROMPT, "--seed", str(SEED), "--height", str(SIZE), "--width",
                          str(SIZE), "-o", str(out), "--quiet"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    with Image.open(out) as im:
        ours = np.asarray(im.convert("RGB"))
        params = json.loads(im.text["streamexec"])
    assert (params["steps"], params["cfg_scale"], params["sampler"]) == (1, 0.0, "euler_a")

    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref.scheduler = EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
    shape = (1, 4, SIZE // 2, SIZE // 2)
    draws = iter([step_noise(SEED, 0, shape)])
    monkeypatch.setattr(diffusers.schedulers.scheduling_euler_ancestral_discrete, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(np.array(next(draws))))
    _, img = _run(ref, dict(prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE,
                            latents=torch.from_numpy(initial_noise(SEED, shape).copy())))
    assert ((ours > 0) & (ours < 255)).mean() > 0.7
    assert float(np.abs(ours.astype(np.float64) - img[0].astype(np.float64) * 255).max()) <= PIX_TOL


def test_sdxl_checkpoint_described(sdxl_folder: Path) -> None:
    """``plan --check`` words: the 2048-wide cross-attention is SDXL's, text_encoder_2 is CLIP."""
    from streamexec.models.describe import describe_checkpoint
    from streamexec.weights.checkpoint import open_checkpoint

    ckpt = open_checkpoint(sdxl_folder)
    try:
        text = describe_checkpoint(ckpt)
    finally:
        ckpt.close()
    assert "CLIP text encoder with projection: 3 layers, width 32" in text
    assert "CLIP text encoder: 2 layers, width 32" in text
    assert "UNet: in 4 ch, blocks 32/64, cross-attention 64" in text
