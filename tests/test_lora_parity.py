"""LoRA parity against PEFT/diffusers (issue #18): a tiny SD UNet with LoRAs (linear and conv) made by PEFT
(``unet.add_adapter``), saved in diffusers/PEFT keys (``save_lora_weights``) and rewritten in
kohya keys; the reference is the PEFT-adapted UNet itself with ``set_adapters(names, weights)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import UNET_CONFIGS, randomize, rel_err

import streamexec
from streamexec.errors import StreamexecError

pytest.importorskip("peft")

TOL = 1e-4
# attention and feed-forward linears, and (LoCon) the resnets' 3x3 convs and the 1x1 proj_in/out convs
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj", "conv1", "conv2",
           "proj_in", "proj_out"]


def _adapted_unet(tmp: Path):
    """The base UNet saved to ``tmp/unet`` and a PEFT copy with adapters "a" (r=4, alpha=8) and
    "b" (r=2, alpha=2), random LoRA weights; each adapter saved in PEFT keys and kohya keys."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    cfg = UNET_CONFIGS["sd15-like"]
    unet = UNet2DConditionModel(**cfg).eval()
    randomize(unet, 0)
    unet.save_pretrained(tmp / "unet")
    files = {}
    for i, (name, r, alpha) in enumerate([("a", 4, 8), ("b", 2, 2)]):
        unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False),
                         adapter_name=name)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for pname, p in unet.named_parameters():
                if f".{name}." in pname and "lora_" in pname:
                    # fp16-exact values: the kohya copy is stored in fp16, the reference stays the same
                    p.copy_((torch.randn(p.shape, generator=g) * 0.3 / p.shape[1] ** 0.5).half().float())
        sd = get_peft_model_state_dict(unet, adapter_name=name)
        # diffusers/PEFT keys, alpha as a tensor (diffusers would take alpha = r without it)
        peft_sd = {k: v.contiguous() for k, v in sd.items()}
        StableDiffusionPipeline.save_lora_weights(tmp / f"peft_{name}", unet_lora_layers=peft_sd,
                                                  weight_name="lora.safetensors")
        path = tmp / f"peft_{name}" / "lora.safetensors"
        from safetensors.torch import load_file

        saved = load_file(path)
        assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in saved)
        for k in [k for k in saved if k.endswith(".lora_A.weight")]:
            saved[k[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(float(alpha))
        save_file(saved, path)
        kohya = {}
        for k, v in sd.items():
            mod, part = k.rsplit(".lora_", 1)
            base = "lora_unet_" + mod.replace(".", "_")
            kohya[base + (".lora_down.weight" if part == "A.weight" else ".lora_up.weight")] = v.contiguous().half()
            kohya[base + ".alpha"] = torch.tensor(float(alpha))
        save_file(kohya, tmp / f"kohya_{name}.safetensors")
        files[name] = (path, tmp / f"kohya_{name}.safetensors")
    return unet, files, cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    unet, files, cfg = _adapted_unet(tmp)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    ctx = torch.randn(2, 7, cfg["cross_attention_dim"], generator=g)
    t = torch.tensor([999.0, 17.0])
    return tmp, unet, files, (x, t, ctx)


def _ref(unet, names, weights, inputs):
    x, t, ctx = inputs
    unet.set_adapters(names, weights)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def _ours(tmp, loras, inputs):
    x, t, ctx = inputs
    m = streamexec.load(tmp / "unet", component="unet", loras=loras)
    return m(sample=x.numpy(), timestep=t.numpy(), encoder_hidden_states=ctx.numpy())


@pytest.mark.parametrize("fmt", [0, 1], ids=["peft", "kohya"])
def test_one_lora(setup, fmt: int) -> None:
    tmp, unet, files, inputs = setup
    ref = _ref(unet, ["a"], [1.0], inputs)
    ours = _ours(tmp, [(files["a"][fmt], 1.0)], inputs)
    assert rel_err(ours, ref) <= TOL
    # the LoRA matters: the base UNet differs well beyond the tolerance
    unet.disable_adapters()
    with torch.no_grad():
        base = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    unet.enable_adapters()
    assert rel_err(base.numpy(), ref) > 100 * TOL


@pytest.mark.parametrize("fmt", [0, 1], ids=["peft", "kohya"])
def test_two_loras_weighted(setup, fmt: int) -> None:
    tmp, unet, files, inputs = setup
    ref = _ref(unet, ["a", "b"], [0.7, 0.4], inputs)
    ours = _ours(tmp, [(files["a"][fmt], 0.7), (files["b"][1 - fmt], 0.4)], inputs)
    assert rel_err(ours, ref) <= TOL


def test_lora_matching_nothing_is_refused(setup, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tmp, _, _, _ = setup
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(8, 2)}, tmp_path / "x.safetensors")
    with pytest.raises(StreamexecError, match=r"0 matched; e.g. nowhere_to_q"):
        streamexec.load(tmp / "unet", component="unet", loras=[(tmp_path / "x.safetensors", 1.0)])


def test_lora_of_wrong_shape_is_refused(setup, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tmp, _, _, _ = setup
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({key + ".lora_down.weight": torch.zeros(2, 40), key + ".lora_up.weight": torch.zeros(40, 2)},
              tmp_path / "x.safetensors")
    with pytest.raises(StreamexecError, match=r"LoRA gives \(40, 40\), the model's .*to_q.weight is \(32, 32\)"):
        streamexec.load(tmp / "unet", component="unet", loras=[(tmp_path / "x.safetensors", 1.0)])


def test_lycoris_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from streamexec.weights.lora import read_lora

    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "h.safetensors")
    with pytest.raises(StreamexecError, match="LyCORIS LoHa/LoKr .* supported: kohya"):
        read_lora(tmp_path / "h.safetensors")


def test_lora_arg() -> None:
    from streamexec.weights.lora import parse_lora_arg

    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("b.safetensors") == ("b.safetensors", 1.0)
    with pytest.raises(StreamexecError, match="weight 'x' is not a number"):
        parse_lora_arg("b.safetensors:x")
    assert np.isfinite(parse_lora_arg("c:1e-3")[1])


def test_text_encoder_lora(tmp_path: Path) -> None:
    """A PEFT LoRA on CLIP's attention and MLP, saved in diffusers keys (``text_encoder.…``) and in
    kohya keys (``lora_te_…``), at weight 0.6: hidden states and pooled output as PEFT's."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=2)
    model = CLIPTextModel(cfg).eval()
    randomize(model, 2)
    model.save_pretrained(tmp_path / "te")
    model.add_adapter(LoraConfig(r=3, lora_alpha=6, init_lora_weights=False,
                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / p.shape[1] ** 0.5)
    sd = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path / "peft", text_encoder_lora_layers=sd,
                                              weight_name="lora.safetensors")
    from safetensors.torch import load_file

    peft_file = tmp_path / "peft" / "lora.safetensors"
    saved = load_file(peft_file)
    assert all(k.startswith("text_encoder.") for k in saved)
    for k in [k for k in saved if k.endswith(".lora_A.weight")]:
        saved[k[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(6.0)
    save_file(saved, peft_file)
    kohya = {}
    for k, v in sd.items():
        mod, part = k.rsplit(".lora_", 1)
        base = "lora_te_" + mod.replace(".", "_")
        kohya[base + (".lora_down.weight" if part == "A.weight" else ".lora_up.weight")] = v
        kohya[base + ".alpha"] = torch.tensor(6.0)
    save_file(kohya, tmp_path / "kohya.safetensors")

    ids = torch.tensor([[0, 5, 17, 98, 3, 3], [0, 40, 98, 3, 3, 3]])
    model.set_adapter("default")
    from peft.tuners.lora import LoraLayer

    for mod in model.modules():  # weight 0.6, as set_adapters([...], [0.6]) does
        if isinstance(mod, LoraLayer):
            mod.scaling["default"] *= 0.6
    with torch.no_grad():
        ref = model(ids)
        model.disable_adapters()
        base = model(ids)
    assert rel_err(base.last_hidden_state, ref.last_hidden_state) > 100 * TOL  # the LoRA matters
    for path in (peft_file, tmp_path / "kohya.safetensors"):
        m = streamexec.load(tmp_path / "te", component="text_encoder", loras=[(path, 0.6)])
        h, pooled = m(input_ids=ids.numpy())
        assert rel_err(h, ref.last_hidden_state) <= TOL
        assert rel_err(pooled, ref.pooler_output) <= TOL
