"""A checkpoint assembled from the separate files people download, one per role, in the
stable-diffusion.cpp / ComfyUI convention: ``--diffusion-model`` (FLUX transformer or SD UNet),
``--vae``, ``--clip-l``, ``--t5xxl``. Each file is recognised by its keys (``layouts``), checked to
hold the role it was given for, and may replace that component of a folder or all-in-one file.
A folder of loose ``.safetensors`` files is assembled the same way, each file classified by what it
holds (``open_loose_folder``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError, LayoutError
from .checkpoint import Checkpoint, Component, _open_single_file, open_checkpoint

#: role -> the components a file given for it may hold (the first the role stands for).
ROLES: dict[str, tuple[str, ...]] = {
    "diffusion_model": ("transformer", "unet"),
    "vae": ("vae",),
    "clip_l": ("text_encoder",),
    "t5xxl": ("text_encoder_2",),
}
#: the command-line spelling of each role
FLAGS = {"diffusion_model": "--diffusion-model", "vae": "--vae", "clip_l": "--clip-l", "t5xxl": "--t5xxl"}
_ROLE_OF = {c: r for r, comps in ROLES.items() for c in comps}


def role_of(component: str) -> str | None:
    """The role (flag) that supplies ``component``, or None (a component no flag names)."""
    return _ROLE_OF.get(component)


def _open_role(role: str, path: Path) -> Checkpoint:
    """Open one file given for ``role``; refuse a folder, or a file that holds another model."""
    if not path.exists():
        raise CheckpointError(path, f"no such file (given as {FLAGS[role]})")
    if not path.is_file():
        raise CheckpointError(path, f"is a folder; {FLAGS[role]} takes one .safetensors file")
    ckpt = _open_single_file(path)
    held = [c for c in ROLES[role] if c in ckpt.components]
    if not held:
        found = ", ".join(f"{c} ({FLAGS.get(role_of(c) or '', 'no flag')})" for c in ckpt.components)
        ckpt.close()
        raise CheckpointError(path, f"given as {FLAGS[role]} but holds {found}: pass it with that flag")
    return ckpt


def assemble(model: str | Path | None, roles: dict[str, str | Path | None], variant: str | None = None) -> Checkpoint:
    """The checkpoint of ``model`` (file, folder or None) with each role's file put in place of (or
    added as) its component. ``roles`` maps role names (``ROLES``) to files; None values are skipped.
    Two files for one role (the positional file and a flag) and files of the wrong role are refused."""
    given = {r: Path(p) for r, p in roles.items() if p is not None}
    unknown = set(given) - set(ROLES)
    if unknown:
        raise CheckpointError(", ".join(sorted(unknown)), f"unknown role (known: {', '.join(ROLES)})")
    if model is None:
        if not given:
            raise CheckpointError("(no model)", "give MODEL or --diffusion-model FILE")
        first = "diffusion_model" if "diffusion_model" in given else next(iter(given))
        model = given.pop(first)
        base = _open_role(first, Path(model))
    elif _is_loose_folder(Path(model)):
        base = open_loose_folder(Path(model), skip=given)
    else:
        base = open_checkpoint(model, variant=variant)
    parts: list[Checkpoint] = [base]
    try:
        components = dict(base.components)
        owner = {name: Path(base.root) for name in components}
        chosen: dict[str, str] = {}
        for role, path in given.items():
            part = _open_role(role, path)
            parts.append(part)
            for name in ROLES[role]:
                if name not in part.components:
                    continue
                if base.kind == "file" and name in base.components and len(base.components) == 1:
                    raise CheckpointError(path, f"two files for {FLAGS[role]}: {base.root} already is the {name}")
                components[name] = part.components[name]
                owner[name] = path
            chosen[role] = str(path)
        _check_one_denoiser(components, owner)
        if chosen:  # files put together here (a folder or pipeline made as one is left as it is)
            check_shapes(components, owner, given=set(chosen))
        files = {}
        for comp in components.values():
            for t in comp.tensors.values():
                for p in t.parts:
                    files[p.path] = next(c.files[p.path] for c in parts if p.path in c.files)
    except BaseException:
        for c in parts:
            c.close()
        raise
    for c in parts:  # files no component reads any more (a replaced VAE's)
        for key, f in c.files.items():
            if key not in files:
                f.close()
    kind = base.kind if not chosen else "files"
    return Checkpoint(Path(model), kind, files, components, base.model_index, base.ignored, roles=chosen)


def _check_one_denoiser(components: dict[str, Component], owner: dict[str, Path]) -> None:
    if "unet" in components and "transformer" in components:
        raise CheckpointError(owner["transformer"], f"a FLUX transformer together with an SD UNet "
                              f"({owner['unet']}): give one diffusion model")


def _is_loose_folder(path: Path) -> bool:
    return (path.is_dir() and not (path / "model_index.json").is_file() and not (path / "config.json").is_file()
            and any(path.glob("*.safetensors")))


def open_loose_folder(folder: Path, skip: dict[str, Path] | None = None) -> Checkpoint:
    """A folder of loose ``.safetensors`` files (no ``model_index.json``): each file classified by its
    keys, one file per component. Components of the roles in ``skip`` (given by flags) are not
    looked for; two candidates for one component are refused, naming them and the flag that picks.
    Files of no layout streamexec knows (a LoRA, an upscaler) are left out and listed in ``ignored``."""
    skipped = {c for r in (skip or {}) for c in ROLES[r]}
    opened: list[Checkpoint] = []
    ignored: list[str] = []
    found: dict[str, list[Checkpoint]] = {}
    try:
        for p in sorted(folder.glob("*.safetensors")):
            try:
                ckpt = _open_single_file(p)
            except LayoutError:
                ignored.append(p.name)
                continue
            opened.append(ckpt)
            for name in ckpt.components:
                if name not in skipped:
                    found.setdefault(name, []).append(ckpt)
        if not found:
            raise CheckpointError(folder, "no .safetensors file here holds a model streamexec knows "
                                  f"(left out: {', '.join(ignored) or 'none'})")
        clash = [(n, cs) for n, cs in found.items() if len(cs) > 1]
        if clash:
            n, cs = clash[0]
            raise CheckpointError(folder, f"{len(cs)} files hold a {n} ({', '.join(Path(c.root).name for c in cs)}): "
                                  f"pick one with {FLAGS[role_of(n) or 'diffusion_model']} FILE")
        components = {n: cs[0].components[n] for n, cs in found.items()}
        owner = {n: Path(cs[0].root) for n, cs in found.items()}
        _check_one_denoiser(components, owner)
        check_shapes(components, owner)
    except BaseException:
        for c in opened:
            c.close()
        raise
    used = {p.path for comp in components.values() for t in comp.tensors.values() for p in t.parts}
    files = {}
    for c in opened:
        for key, f in c.files.items():
            if key in used:
                files[key] = f
            else:
                f.close()
    return Checkpoint(folder, "folder", files, components, ignored=ignored)


#: (component, internal key, dim, what) of the sizes one component must agree on with another.
_SIZES = {
    "flux_in": ("transformer", "x_embedder.weight", 1, "takes latents of {} channels (2x2 packed)"),
    "flux_txt": ("transformer", "context_embedder.weight", 1, "takes T5 states of width {}"),
    "flux_pooled": ("transformer", "time_text_embed.text_embedder.linear_1.weight", 1,
                    "takes a pooled CLIP vector of width {}"),
    "unet_out": ("unet", "conv_out.weight", 0, "predicts latents of {} channels"),
    "unet_cross": ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", 1,
                   "takes text states of width {}"),
    "clip": ("text_encoder", "text_model.embeddings.token_embedding.weight", 1, "has width {}"),
    "t5": ("text_encoder_2", "encoder.embed_tokens.weight", 1, "has width {}"),
    "latent": ("vae", "decoder.conv_in.weight", 1, "has {} latent channels"),
}
#: pairs that must agree: (denoiser size, other size, factor: denoiser = factor * other)
_AGREE = (("flux_in", "latent", 4), ("flux_txt", "t5", 1), ("flux_pooled", "clip", 1), ("unet_out", "latent", 1),
          ("unet_cross", "clip", 1))


def check_shapes(components: dict[str, Component], owner: dict[str, Path], given: set[str] | None = None) -> None:
    """Refuse components whose sizes disagree (headers only): a VAE whose latent channels are not
    what the denoiser takes, a CLIP or T5 whose width is not the one it reads. The message names the
    file of the component given separately (else the other one's) and what each side has."""

    def size(name: str) -> int | None:
        comp, key, dim, _ = _SIZES[name]
        t = components.get(comp)
        m = None if t is None else t.tensors.get(key)
        return None if m is None or len(m.shape) <= dim else int(m.shape[dim])

    for den, other, factor in _AGREE:
        if den == "unet_cross" and "text_encoder_2" in components:
            continue  # two text encoders (SDXL): the UNet reads both widths together
        a, b = size(den), size(other)
        if a is None or b is None or a == factor * b:
            continue
        dcomp, ocomp = _SIZES[den][0], _SIZES[other][0]
        given = given or set()
        blame = dcomp if role_of(dcomp) in given and role_of(ocomp) not in given else ocomp
        raise CheckpointError(owner[blame], f"{ocomp} {_SIZES[other][3].format(b)} but the {dcomp} "
                              f"({owner[dcomp].name}) {_SIZES[den][3].format(a // factor)}")


def role_files(flags: Any) -> dict[str, str]:
    """The files given with the role flags (``--diffusion-model`` …; attributes of an argparse
    namespace, by role name), by role."""
    return {r: getattr(flags, r) for r in ROLES if getattr(flags, r, None)}


def open_model(flags: Any, model: str | Path | None) -> Checkpoint:
    """MODEL (file or folder, or None) with the role flags' files in place."""
    return assemble(model, role_files(flags), variant=getattr(flags, "variant", None))
