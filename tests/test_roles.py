"""Running from the separate files people download (issue 16): a tiny FLUX.1-schnell written as the
four files of the ComfyUI / stable-diffusion.cpp set in their real layouts — ``flux1-schnell``
(BFL keys), ``ae`` (BFL autoencoder keys), ``clip_l`` and ``t5xxl`` (transformers names, ComfyUI's
files) — run with ``--diffusion-model --vae --clip-l --t5xxl --latents-in`` and compared with
diffusers' ``FluxPipeline`` whose transformer and VAE come from diffusers' single-file loaders
(``from_single_file(..., config=...)``) and whose text encoders hold the same tensors. Nothing in
these files says their widths: streamexec reads them from the shapes (CLIP heads = width / 64, the
FLUX head size 128 and its RoPE axes 16/56/56, the VAE's 32 norm groups and its scaling/shift
factors — FLUX's for a 16-channel latent — are what shapes cannot tell, so the tiny model keeps
those). Bad input: wrong role, two files for one role, a missing file: one line, exit 2, nothing
written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import flux_converter  # noqa: E402
from layout_keys import bfl_flux_shapes, ldm_vae_shapes  # noqa: E402

from streamexec.configs import REFERENCE_DIR  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse at dusk, oil painting"
SIZE = 16  # pixels: 2-level VAE (2 latent pixels per image pixel), 2x2 packing -> 16 tokens
MSL = 256  # schnell's default; run has no flag for it
STEPS = 2
PIX_TOL = 2  # of 255

FLUX_CFG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=64, guidance_embeds=False,
                axes_dims_rope=(16, 56, 56))
VAE_CFG = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32), latent_channels=16, layers_per_block=1,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
               shift_factor=0.1159)


def _values(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """~unit activations through a tiny model: norm scales near 1, other vectors small, matrices by fan-in."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if k.endswith(".scale") or (len(s) == 1 and "norm" in k and k.endswith("weight")):
            out[k] = 1 + 0.1 * torch.randn(s, generator=g)
        elif len(s) == 1:
            out[k] = 0.02 * torch.randn(s, generator=g)
        else:
            out[k] = torch.randn(s, generator=g) / math.prod(s[1:]) ** 0.5
    return out


def _text_configs() -> tuple[dict, dict]:
    clip = json.loads((REFERENCE_DIR / "sd15" / "text_encoder" / "config.json").read_text())
    clip.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, projection_dim=64)
    t5 = json.loads((REFERENCE_DIR / "flux-schnell" / "text_encoder_2" / "config.json").read_text())
    t5.update(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2)
    for c in (clip, t5):
        for k in ("_name_or_path", "architectures", "torch_dtype", "transformers_version"):
            c.pop(k, None)
    return clip, t5


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The four files, and the diffusers reference pipeline built from them."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers import FluxPipeline as RefFlux
    from diffusers.loaders import single_file_model
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from streamexec.pipelines.schedulers import FLUX_SCHNELL_SCHEDULER_CONFIG

    root = tmp_path_factory.mktemp("four")
    files = {"diffusion_model": root / "flux1-schnell.safetensors", "vae": root / "ae.safetensors",
             "clip_l": root / "clip_l.safetensors", "t5xxl": root / "t5xxl_fp16.safetensors"}
    configs = root / "configs"
    for name, cls, cfg in (("transformer", FluxTransformer2DModel, FLUX_CFG), ("vae", AutoencoderKL, VAE_CFG)):
        cls.from_config(cfg).save_config(configs / name)  # config.json only: diffusers' `config=`
    save_file(_values(bfl_flux_shapes(FLUX_CFG), 1), str(files["diffusion_model"]))
    save_file(_values(ldm_vae_shapes(VAE_CFG), 2), str(files["vae"]))
    clip_cfg, t5_cfg = _text_configs()
    torch.manual_seed(3)
    clip = CLIPTextModel(CLIPTextConfig(**clip_cfg)).eval()
    t5 = T5EncoderModel(T5Config(**t5_cfg)).eval()
    with torch.no_grad():
        for p in list(clip.parameters()) + list(t5.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    clip_sd = {k: v.contiguous() for k, v in clip.state_dict().items() if "position_ids" not in k}
    save_file(clip_sd, str(files["clip_l"]))
    sd = t5.state_dict()  # ComfyUI's t5xxl files store both tied embeddings
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(files["t5xxl"]))

    loaders = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    saved = loaders["checkpoint_mapping_fn"]
    loaders["checkpoint_mapping_fn"] = flux_converter(FLUX_CFG["attention_head_dim"] * FLUX_CFG["num_attention_heads"])
    try:
        transformer = FluxTransformer2DModel.from_single_file(str(files["diffusion_model"]),
                                                              config=str(configs / "transformer"))
    finally:
        loaders["checkpoint_mapping_fn"] = saved
    vae = AutoencoderKL.from_single_file(str(files["vae"]), config=str(configs / "vae"))
    ref = RefFlux(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHNELL_SCHEDULER_CONFIG),
                  vae=vae.eval(), text_encoder=clip,
                  tokenizer=CLIPTokenizer.from_pretrained(REFERENCE_DIR / "sd15" / "tokenizer"),
                  text_encoder_2=t5,
                  tokenizer_2=T5TokenizerFast.from_pretrained(REFERENCE_DIR / "flux-schnell" / "tokenizer_2"),
                  transformer=transformer.eval())
    return {"files": files, "ref": ref, "root": root}


def streamexec_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "streamexec", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _flags(files: dict, **swap: Path) -> list[str]:
    files = {**files, **swap}
    return ["--diffusion-model", str(files["diffusion_model"]), "--vae", str(files["vae"]),
            "--clip-l", str(files["clip_l"]), "--t5xxl", str(files["t5xxl"])]


def test_four_files_match_diffusers(four: dict, tmp_path: Path) -> None:
    from PIL import Image

    packed = (1, (SIZE // 4) ** 2, 64)
    latents = np.random.default_rng(9).standard_normal(packed, dtype=np.float32)
    np.save(tmp_path / "lat.npy", latents)
    r = streamexec_cli("run", *_flags(four["files"]), "--prompt", PROMPT, "--steps", str(STEPS), "--height", str(SIZE),
                   "--width", str(SIZE), "--latents-in", str(tmp_path / "lat.npy"),
                   "--quiet", "-o", str(tmp_path / "out.png"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ours = np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).astype(np.float64)
    with torch.no_grad():
        ref = four["ref"](prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                          max_sequence_length=MSL, latents=torch.from_numpy(latents.copy()),
                          output_type="np", return_dict=False)[0]
    ref = np.asarray(ref)[0].astype(np.float64) * 255
    assert ((ours > 0) & (ours < 255)).mean() > 0.7  # not a saturated picture
    diff = float(np.abs(ours - ref).max())
    print(f"four files vs diffusers: max pixel diff {diff:.2f}/255")
    assert diff <= PIX_TOL


def test_plan_records_every_file_and_run_reopens_them(four: dict, tmp_path: Path) -> None:
    import yaml

    files = four["files"]
    r = streamexec_cli("plan", *_flags(files), "--height", str(SIZE), "--width", str(SIZE), "-o", "p.yaml",
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ck = yaml.safe_load((tmp_path / "p.yaml").read_text())["checkpoint"]
    assert ck["root"] == str(files["diffusion_model"])
    assert {f["path"] for f in ck["files"]} == {str(p) for p in files.values()}
    assert all(f["size"] == Path(f["path"]).stat().st_size and len(f["header_sha256"]) == 64 for f in ck["files"])
    assert ck["roles"] == {r: str(files[r]) for r in ("vae", "clip_l", "t5xxl")}
    # run reopens the plan's files by role (no flags); another file for a role is refused
    r = streamexec_cli("run", "p.yaml", "--prompt", PROMPT, "--steps", "1", "--quiet", "-o", "a.png", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "a.png").is_file(), r.stderr
    r = streamexec_cli("run", "p.yaml", "--vae", str(files["t5xxl"]), "--prompt", "x", "-o", "b.png", cwd=tmp_path)
    _one_line_exit_2(r, "--vae")
    assert not (tmp_path / "b.png").exists()
    r = streamexec_cli("plan", str(files["diffusion_model"]), "--check", "--vae", str(files["vae"]),
                   "--clip_l", str(files["clip_l"]), "--t5xxl", str(files["t5xxl"]), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for line in ("transformer", "bfl-flux from flux1-schnell.safetensors"), ("vae", "bfl-ae from ae.safetensors"), \
            ("text_encoder", "comfy-clip-l from clip_l.safetensors"), \
            ("text_encoder_2", "comfy-t5 from t5xxl_fp16.safetensors"):
        assert any(x.strip().startswith(line[0] + " ") and line[1] in x for x in r.stdout.splitlines()), r.stdout


def _one_line_exit_2(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_role_files_are_one_line_errors(four: dict, tmp_path: Path) -> None:
    files = four["files"]
    # a VAE passed as --t5xxl
    r = streamexec_cli("run", *_flags(files, t5xxl=files["vae"]), "--prompt", "x", "-o", "o.png", cwd=tmp_path)
    _one_line_exit_2(r, str(files["vae"]), "--t5xxl", "--vae")
    # two files for the diffusion model: MODEL and --diffusion-model
    r = streamexec_cli("plan", str(files["diffusion_model"]), *_flags(files), "-o", "p.yaml", cwd=tmp_path)
    _one_line_exit_2(r, "two files", "--diffusion-model")
    # a T5 whose width is not what the transformer reads (FLUX_CFG joint_attention_dim 32)
    from transformers import T5Config, T5EncoderModel

    wide = four["root"] / "t5xxl-wide.safetensors"
    if not wide.exists():
        _, t5_cfg = _text_configs()
        sd = T5EncoderModel(T5Config(**{**t5_cfg, "d_model": 48})).state_dict()
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(wide))
    r = streamexec_cli("plan", *_flags(files, t5xxl=wide), "-o", "p.yaml", cwd=tmp_path)
    _one_line_exit_2(r, str(wide), "width 48", "flux1-schnell.safetensors", "width 32")
    # a missing file
    r = streamexec_cli("plan", *_flags(files, clip_l=tmp_path / "nope.safetensors"), "-o", "p.yaml", cwd=tmp_path)
    _one_line_exit_2(r, "nope.safetensors", "--clip-l")
    assert not list(tmp_path.iterdir())  # nothing written


def _link_folder(folder: Path, files: dict) -> Path:
    folder.mkdir()
    for p in files.values():
        (folder / p.name).symlink_to(p)
    return folder


def test_loose_folder_is_assembled_by_what_the_files_hold(four: dict, tmp_path: Path) -> None:
    from streamexec.pipelines.generate import Request, open_pipeline
    from streamexec.weights.roles import assemble

    files = four["files"]
    folder = _link_folder(tmp_path / "flux", files)
    save_file({"lora_unet_down.alpha": torch.ones(())}, str(folder / "a-lora.safetensors"))  # no model: left out
    ckpt = assemble(folder, {})
    try:
        assert ckpt.kind == "folder" and ckpt.ignored == ["a-lora.safetensors"]
        owner = {n: {Path(p.path).name for t in c.tensors.values() for p in t.parts}
                 for n, c in ckpt.components.items()}
        assert owner == {"transformer": {"flux1-schnell.safetensors"}, "vae": {"ae.safetensors"},
                         "text_encoder": {"clip_l.safetensors"}, "text_encoder_2": {"t5xxl_fp16.safetensors"}}
    finally:
        ckpt.close()
    # the folder runs as the four flags do (same latents in, same image out)
    lat = np.random.default_rng(9).standard_normal((1, (SIZE // 4) ** 2, 64), dtype=np.float32)
    req = Request(PROMPT, steps=1, height=SIZE, width=SIZE, latents_in=lat)
    with open_pipeline(folder) as a, open_pipeline(None, files=files) as b:
        assert np.array_equal(a(req).image, b(req).image)


def test_loose_folder_ambiguous_or_incomplete(four: dict, tmp_path: Path) -> None:
    from streamexec.errors import StreamexecError
    from streamexec.pipelines.generate import open_pipeline
    from streamexec.weights.roles import assemble

    files = four["files"]
    folder = _link_folder(tmp_path / "two-vaes", files)
    (folder / "other-ae.safetensors").symlink_to(files["vae"])
    with pytest.raises(StreamexecError) as e:
        assemble(folder, {})
    msg = str(e.value)
    assert "\n" not in msg and "ae.safetensors, other-ae.safetensors" in msg and "--vae" in msg
    ckpt = assemble(folder, {"vae": files["vae"]})  # the flag picks
    assert ckpt.roles == {"vae": str(files["vae"])}
    ckpt.close()
    partial = _link_folder(tmp_path / "no-t5", {k: v for k, v in files.items() if k != "t5xxl"})
    with pytest.raises(StreamexecError) as e:
        open_pipeline(partial)
    msg = str(e.value)
    assert "\n" not in msg and "missing text_encoder_2 (--t5xxl FILE)" in msg


# ------------------------------------------------------------------------------- scaled fp8 (ComfyUI)

F8 = torch.float8_e4m3fn


def _scaled(values: dict[str, torch.Tensor], seed: int, spelling: str = ".scale_weight",
            keep: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(what a ComfyUI scaled-fp8 file stores, the f32 weights it means): every matrix but ``keep``
    as e4m3 of value / scale with an f32 ``<layer>.scale_weight`` (the reference multiplies back in
    torch), the rest f32, and the ``scaled_fp8`` marker."""
    g = torch.Generator().manual_seed(seed)
    stored: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=F8)}
    meant: dict[str, torch.Tensor] = {}
    for k, v in values.items():
        if v.ndim == 2 and k.endswith(".weight") and not k.endswith(keep):
            s = float(v.abs().max()) / 200 * (0.5 + torch.rand((), generator=g).item())
            q = (v / s).to(F8)
            stored[k] = q
            stored[k[: -len(".weight")] + spelling] = torch.tensor([s], dtype=torch.float32)
            stored[k[: -len(".weight")] + ".scale_input"] = torch.ones(1)
            meant[k] = q.to(torch.float32) * torch.tensor(s, dtype=torch.float32)
        else:
            stored[k] = v.clone().contiguous()
            meant[k] = v.clone()
    return stored, meant


def test_scaled_fp8_flux_transformer_and_t5(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel
    from helpers import flux_inputs, rel_err
    from transformers import T5Config, T5EncoderModel

    import streamexec

    # FLUX transformer, BFL keys, .scale_weight
    stored, meant = _scaled(_values(bfl_flux_shapes(FLUX_CFG), 5), 6)
    save_file(stored, str(tmp_path / "flux1-schnell-fp8-scaled.safetensors"))
    model = FluxTransformer2DModel(**FLUX_CFG).eval()
    model.load_state_dict(flux_converter(128)(meant), strict=True)
    inputs = flux_inputs(FLUX_CFG, 1, 4, 4, 6, seed=7)
    with torch.no_grad():
        ref = model(**inputs).sample
    ours = streamexec.load(tmp_path / "flux1-schnell-fp8-scaled.safetensors", component="transformer")(
        **{k: None if v is None else v.numpy() for k, v in inputs.items()})
    assert rel_err(ours, ref) <= 1e-5
    # T5, the newer .weight_scale spelling; token embedding unscaled
    _, t5_cfg = _text_configs()
    t5 = T5EncoderModel(T5Config(**t5_cfg)).eval()
    sd = {k: v.clone() for k, v in t5.state_dict().items()}
    stored, meant = _scaled(sd, 8, ".weight_scale", keep=("shared.weight", "embed_tokens.weight"))
    save_file(stored, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    t5.load_state_dict(meant, strict=True)
    ids = torch.randint(0, 32000, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = t5(ids).last_hidden_state
    ours = streamexec.load(component="text_encoder_2", t5xxl=tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")(
        input_ids=ids.numpy())
    assert rel_err(ours, ref) <= 1e-4


def test_scaled_fp8_bad_scales_are_one_line_errors(tmp_path: Path) -> None:
    import streamexec
    from streamexec.errors import StreamexecError

    stored, _ = _scaled(_values(bfl_flux_shapes(FLUX_CFG), 5), 6)
    save_file(stored, str(tmp_path / "good.safetensors"))
    r = streamexec_cli("plan", "--check", "--diffusion-model", str(tmp_path / "good.safetensors"), cwd=tmp_path)
    assert r.returncode == 0 and "fp8_e4m3 scaled" in r.stdout, r.stderr
    missing = dict(stored)
    del missing["double_blocks.0.img_attn.qkv.scale_weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    r = streamexec_cli("plan", "--check", "--diffusion-model", str(tmp_path / "missing.safetensors"), cwd=tmp_path)
    _one_line_exit_2(r, "missing.safetensors", "double_blocks.0.img_attn.qkv.weight", "no scale_weight")
    bad = dict(stored)
    bad["double_blocks.0.img_attn.qkv.scale_weight"] = torch.tensor([float("inf")])
    save_file(bad, str(tmp_path / "inf.safetensors"))
    from helpers import flux_inputs

    inputs = {k: None if v is None else v.numpy() for k, v in flux_inputs(FLUX_CFG, 1, 2, 2, 3, seed=1).items()}
    with pytest.raises(StreamexecError) as e:
        streamexec.load(tmp_path / "inf.safetensors", component="transformer")(**inputs)
    assert "\n" not in str(e.value) and "not finite" in str(e.value) and "inf.safetensors" in str(e.value)


def test_all_in_one_file_runs_as_the_four_files(four: dict, tmp_path: Path) -> None:
    """Comfy-Org's ``flux1-schnell-fp8.safetensors`` layout: the four files' tensors under
    ``model.diffusion_model.``, ``vae.``, ``text_encoders.clip_l.transformer.`` and
    ``text_encoders.t5xxl.transformer.`` in one file, given as MODEL: the same image as the four
    files (which match diffusers, above)."""
    from safetensors.torch import load_file

    from streamexec.pipelines.generate import Request, open_pipeline

    files = four["files"]
    prefix = {"diffusion_model": "model.diffusion_model.", "vae": "vae.",
              "clip_l": "text_encoders.clip_l.transformer.", "t5xxl": "text_encoders.t5xxl.transformer."}
    merged = {prefix[r] + k: v for r, p in files.items() for k, v in load_file(str(p)).items()}
    save_file(merged, str(tmp_path / "flux1-schnell-aio.safetensors"))
    lat = np.random.default_rng(9).standard_normal((1, (SIZE // 4) ** 2, 64), dtype=np.float32)
    req = Request(PROMPT, steps=1, height=SIZE, width=SIZE, latents_in=lat)
    with open_pipeline(tmp_path / "flux1-schnell-aio.safetensors") as a, open_pipeline(None, files=files) as b:
        assert a.checkpoint.kind == "file" and sorted(a.checkpoint.components) == sorted(b.checkpoint.components)
        want = b(req).image
        assert np.array_equal(a(req).image, want)
    # --vae replaces the all-in-one file's VAE (the same tensors here: the same image)
    with open_pipeline(tmp_path / "flux1-schnell-aio.safetensors", files={"vae": files["vae"]}) as c:
        assert c.checkpoint.roles == {"vae": str(files["vae"])}
        assert {Path(p.path).name for t in c.checkpoint.components["vae"].tensors.values() for p in t.parts} \
            == {"ae.safetensors"}
        assert np.array_equal(c(req).image, want)


# ---------------------------------------------------------------------- SD 1.5 single file + --vae

UNET_CFG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
                norm_num_groups=32)


def test_sd15_single_file_unet_reads_its_shapes_and_takes_an_external_vae(tmp_path: Path) -> None:
    """A tiny SD 1.5 LDM single file (UNet of other widths/depths than SD 1.5's, 8 heads and 32 norm
    groups as published) with a separate VAE: the UNet matches diffusers' ``from_single_file``, and
    ``--vae`` supplies the VAE the file's own is replaced by."""
    from diffusers import UNet2DConditionModel
    from helpers import rel_err
    from layout_keys import ldm_unet_shapes

    import streamexec
    from streamexec.weights.roles import assemble

    full = dict(UNet2DConditionModel.from_config(UNET_CFG).config)
    unet = {"model.diffusion_model." + k: v for k, v in _values(ldm_unet_shapes(full), 11).items()}
    sd_vae = {**VAE_CFG, "latent_channels": 4, "use_quant_conv": True, "use_post_quant_conv": True}
    own_vae = {"first_stage_model." + k: v for k, v in _values(ldm_vae_shapes(sd_vae), 12).items()}
    save_file({**unet, **own_vae}, str(tmp_path / "v1-5-tiny.safetensors"))
    save_file(_values(ldm_vae_shapes(sd_vae), 13), str(tmp_path / "vae-ft-mse.safetensors"))
    UNet2DConditionModel.from_config(UNET_CFG).save_config(tmp_path / "unet-config")
    ref = UNet2DConditionModel.from_single_file(str(tmp_path / "v1-5-tiny.safetensors"),
                                                config=str(tmp_path / "unet-config")).eval()
    g = torch.Generator().manual_seed(14)
    x, c, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 64, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=c).sample
    ours = streamexec.load(tmp_path / "v1-5-tiny.safetensors", component="unet")(
        sample=x.numpy(), timestep=t.numpy(), encoder_hidden_states=c.numpy())
    assert rel_err(ours, want) <= 1e-4
    ckpt = assemble(tmp_path / "v1-5-tiny.safetensors", {"vae": tmp_path / "vae-ft-mse.safetensors"})
    try:
        vae_files = {Path(p.path).name for t in ckpt.components["vae"].tensors.values() for p in t.parts}
        assert vae_files == {"vae-ft-mse.safetensors"} and ckpt.components["vae"].config["latent_channels"] == 4
    finally:
        ckpt.close()
