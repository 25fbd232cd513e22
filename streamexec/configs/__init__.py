"""The published configs of SD 1.5, SD 2.1 (768-v), SDXL 1.0 base, FLUX.1-schnell and FLUX.1-dev (model_index, component
config.json, scheduler config), SD 1.5's CLIP tokenizer files and FLUX.1's T5 v1.1 tokenizer
(``flux-schnell/tokenizer_2/``) — no weights. They are the defaults for single-file checkpoints,
which carry no config or tokenizer, and the reference shapes for tests and tools. Copied from the
published Hugging Face repositories (runwayml/stable-diffusion-v1-5, black-forest-labs/FLUX.1-schnell,
FLUX.1-dev, stabilityai/stable-diffusion-2-1 and stable-diffusion-xl-base-1.0); the CLIP BPE files
are OpenAI's (MIT), the T5 vocabulary Google's (Apache 2.0). SD 2.1's and SDXL's tokenizer folders hold
only their tokenizer_config/special_tokens_map (both pad with ``!``): their BPE files are SD 1.5's."""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent
PRESETS = ("sd15", "sd21", "sdxl", "flux-schnell", "flux-dev")


def reference(name: str) -> Path:
    """The folder of a shipped reference pipeline (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise KeyError(f"no shipped reference {name!r} (have: {', '.join(PRESETS)})")
    return REFERENCE_DIR / name


def default_config(component: str, tensors: dict, *, sdxl: bool = False) -> dict | None:
    """The config of a single file of this component (single files carry none): the published
    config it most likely comes from — SD 1.5's UNet and CLIP, SD 1.5's or FLUX's VAE by latent
    channels, with every size the tensors tell taken from the tensors instead (:func:`from_shapes`),
    so a file of other widths or depths is read as what it holds; SDXL's UNet (a ``text_time`` UNet),
    OpenCLIP bigG and — for a whole SDXL file (``sdxl``) — CLIP-L and VAE as published (the builders
    still check every weight shape against them). FLUX and T5 single files get None: their builders
    read depth and widths from the weights."""
    if component == "unet" and (sdxl or "add_embedding.linear_1.weight" in tensors):
        return _load("sdxl/unet")
    if component == "text_encoder_2" and "text_model.embeddings.token_embedding.weight" in tensors:
        return _load("sdxl/text_encoder_2")
    if sdxl and component == "text_encoder":
        return _load("sdxl/text_encoder")
    if component in ("unet", "text_encoder"):
        return from_shapes(component, tensors, _load(f"sd15/{component}"))
    if component == "vae":
        conv_in = tensors.get("decoder.conv_in.weight")
        latent = conv_in.shape[1] if conv_in is not None else 4
        if latent != 16 and sdxl:
            return _load("sdxl/vae")
        return from_shapes("vae", tensors, _load("flux-schnell/vae" if latent == 16 else "sd15/vae"))
    return None


#: CLIP text towers (L, G, ViT-H) all use 64-wide attention heads; the shapes cannot tell the count.
CLIP_HEAD_DIM = 64


def _count(tensors: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in tensors:
        n += 1
    return n


def from_shapes(component: str, tensors: dict, base: dict) -> dict:
    """``base`` with the sizes the tensors (internal names, anything with ``.shape``) determine:
    CLIP width, depth, MLP width, vocabulary and positions (heads = width / 64); UNet channels,
    levels, resnets per level, which levels attend, text width, projection kind; VAE channel
    widths, resnets per block and latent channels. What shapes cannot tell (activation, norm
    groups, the UNet's heads, scaling factors) stays the published value."""
    cfg = dict(base)
    if component == "text_encoder":
        emb = tensors.get("text_model.embeddings.token_embedding.weight")
        if emb is None:
            return cfg
        cfg["vocab_size"], width = (int(x) for x in emb.shape)
        cfg["hidden_size"] = width
        cfg["num_attention_heads"] = max(1, width // CLIP_HEAD_DIM)
        cfg["num_hidden_layers"] = _count(tensors, "text_model.encoder.layers.{}.self_attn.q_proj.weight")
        fc1 = tensors.get("text_model.encoder.layers.0.mlp.fc1.weight")
        if fc1 is not None:
            cfg["intermediate_size"] = int(fc1.shape[0])
        pos = tensors.get("text_model.embeddings.position_embedding.weight")
        if pos is not None:
            cfg["max_position_embeddings"] = int(pos.shape[0])
    elif component == "unet":
        _unet_from_shapes(cfg, tensors)
    elif component == "vae":
        blocks = _count(tensors, "encoder.down_blocks.{}.resnets.0.conv1.weight")
        if blocks:
            cfg["block_out_channels"] = [int(tensors[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                                         for i in range(blocks)]
            cfg["layers_per_block"] = _count(tensors, "encoder.down_blocks.0.resnets.{}.conv1.weight")
            for key in ("down_block_types", "up_block_types"):
                if isinstance(cfg.get(key), list) and cfg[key]:
                    cfg[key] = [cfg[key][0]] * blocks
        conv_in = tensors.get("decoder.conv_in.weight")
        if conv_in is not None:
            cfg["latent_channels"] = int(conv_in.shape[1])
        cfg["use_quant_conv"] = "quant_conv.weight" in tensors
        cfg["use_post_quant_conv"] = "post_quant_conv.weight" in tensors
    return cfg


def _load(rel: str) -> dict:
    cfg = json.loads((REFERENCE_DIR / rel / "config.json").read_text())
    cfg["_streamexec_default"] = f"streamexec/configs/{rel}/config.json"
    return cfg


def _unet_from_shapes(cfg: dict, tensors: dict) -> None:
    if "conv_in.weight" not in tensors or "conv_out.weight" not in tensors:
        return
    cfg["in_channels"] = int(tensors["conv_in.weight"].shape[1])
    cfg["out_channels"] = int(tensors["conv_out.weight"].shape[0])
    levels = _count(tensors, "down_blocks.{}.resnets.0.conv1.weight")
    cfg["block_out_channels"] = [int(tensors[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                                 for i in range(levels)]
    cfg["layers_per_block"] = _count(tensors, "down_blocks.0.resnets.{}.conv1.weight")
    attends = [f"down_blocks.{i}.attentions.0.proj_in.weight" in tensors for i in range(levels)]
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends]
    cfg["up_block_types"] = ["CrossAttnUpBlock2D" if f"up_blocks.{i}.attentions.0.proj_in.weight" in tensors
                             else "UpBlock2D" for i in range(levels)]
    first = next((i for i, a in enumerate(attends) if a), None)
    if first is not None:
        p = f"down_blocks.{first}.attentions.0"
        cfg["cross_attention_dim"] = int(tensors[f"{p}.transformer_blocks.0.attn2.to_k.weight"].shape[1])
        cfg["use_linear_projection"] = len(tensors[f"{p}.proj_in.weight"].shape) == 2
