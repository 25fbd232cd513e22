"""The ``streamexec`` command line: ``plan``, ``run`` and ``inspect``.

Every failure the user can cause ends with one readable line on stderr and a non-zero exit code;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import PlanError, StreamexecError
from .sizes import format_size, parse_budget

EPILOG = "Run 'streamexec COMMAND --help' for the flags of each command."


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")


def _add_sampler_flags(p: argparse.ArgumentParser) -> None:
    from .pipelines.schedulers import SAMPLERS, SPACINGS

    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="sampler (default: the checkpoint's scheduler); lcm and tcd for LCM/TCD-distilled models "
                   "and LoRAs (4-8 steps, --cfg-scale 1)")
    p.add_argument("--timestep-spacing", choices=SPACINGS, default=None,
                   help="timesteps over the training schedule (default: the checkpoint's); trailing for "
                   "turbo/distilled models; sgm_uniform (euler, euler_a, dpmpp_2m) as stable-diffusion.cpp names it")
    p.add_argument("--eta", type=float, default=None,
                   help="share of fresh noise per step, 0..1: ddim (default 0) and tcd (default 0.3)")


def _add_role_flags(p: argparse.ArgumentParser) -> None:
    """stable-diffusion.cpp's per-file flags (issue 16): each names one component's file."""
    g = p.add_argument_group("separate files (each may also replace that component of MODEL)")
    g.add_argument("--diffusion-model", metavar="FILE", help="FLUX transformer or SD UNet file (may stand for MODEL)")
    g.add_argument("--vae", metavar="FILE", help="VAE file (e.g. ae.safetensors, vae-ft-mse-840000-ema-pruned)")
    g.add_argument("--clip-l", "--clip_l", dest="clip_l", metavar="FILE", help="CLIP-L text encoder file")
    g.add_argument("--t5xxl", metavar="FILE", help="T5-XXL text encoder file (FLUX)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamexec",
        description=(
            "Run huge image models (Stable Diffusion 1.5, FLUX.1) on a CPU inside a memory budget, "
            "streaming the weights layer by layer from your own safetensors files."
        ),
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"streamexec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "plan",
        help="read a checkpoint's headers and write a layer-by-layer execution plan",
        description=(
            "Open MODEL (a .safetensors file, a diffusers component folder or a pipeline folder), "
            "validate every header, and write plan.yaml: every op with its shapes, GEMM sizes, "
            "FLOPs, weight and activation bytes, and the schedule that fits --memory-budget. "
            "Reads headers only, never weight data."
        ),
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint file or folder (or use --diffusion-model)")
    _add_role_flags(p)
    p.add_argument(
        "--component", action="append",
        help="component(s) to plan: unet, vae, text_encoder, transformer, text_encoder_2 "
        "(repeatable; default: every component the checkpoint has)",
    )
    p.add_argument("--variant", help="weight variant in a diffusers folder (e.g. fp16)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument(
        "--batch", type=int, default=1,
        help="images per prompt (SD 1.5's UNet and text encoder run twice that: prompt + negative prompt)",
    )
    p.add_argument("--no-cfg", action="store_true", help="plan SD 1.5 without classifier-free guidance (batch x1)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="SD 1.5 guidance scale recorded in the plan; <= 1 plans without classifier-free guidance "
                   "(batch x1, as --no-cfg)")
    _add_sampler_flags(p)
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="plan with a LoRA (repeatable; counted in memory, recorded for run)")
    p.add_argument("--vae-mode", choices=["decode", "encode"], default="decode", help="VAE direction to plan")
    p.add_argument("--steps", type=int, default=None, help="denoising steps recorded in the plan")
    p.add_argument(
        "--memory-budget", default=None, metavar="SIZE",
        help="peak RSS of the whole process, e.g. 512M, 1G; 'auto' (cgroup limit or available RAM "
        "minus 10%%), 'min' (the fastest schedule within the smallest budget that fits) or 'smallest' (every "
        "op at its smallest option: for testing the out-of-core paths); default: no bound",
    )
    p.add_argument("-o", "--output", default="plan.yaml", help="plan file to write (default plan.yaml)")
    p.add_argument(
        "--check", action="store_true",
        help="only open and validate the checkpoint and print what it holds",
    )
    _add_common(p)

    r = sub.add_parser(
        "run",
        help="run a plan (or a model folder) and write a PNG",
        description="Execute PLAN (plan.yaml, or a model folder planned on the fly) and write an image.",
    )
    r.add_argument("plan", metavar="PLAN", nargs="?",
                   help="plan.yaml, or a model file/folder (or use --diffusion-model)")
    _add_role_flags(r)
    r.add_argument("--model", help="model folder for a shipped plan that does not name one")
    r.add_argument("--prompt", default="", help="text prompt")
    r.add_argument("--negative-prompt", default="", help="negative prompt (SD 1.5)")
    r.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same image)")
    r.add_argument("--steps", type=int, default=None, help="denoising steps")
    r.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (SD 1.5)")
    r.add_argument("--guidance", type=float, default=None, help="distilled guidance (FLUX.1-dev)")
    _add_sampler_flags(r)
    r.add_argument("--karras", action="store_true", help="Karras sigmas")
    r.add_argument("--height", type=int, default=None)
    r.add_argument("--width", type=int, default=None)
    r.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="apply a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) with WEIGHT (default 1); "
                   "repeatable; merged on the fly, the base weights are never copied")
    r.add_argument("--lora-dir", metavar="DIR", help="where <lora:NAME:WEIGHT> in the prompt finds NAME.safetensors")
    r.add_argument("--init-image", help="img2img: starting image")
    r.add_argument("--strength", type=float, default=0.75, help="img2img strength")
    r.add_argument("--tokenizer", help="tokenizer folder for single-file checkpoints")
    r.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="peak RSS bound, e.g. 1G; 'auto' or 'min' as for plan")
    r.add_argument("--latents-in", help="initial latents (.npy), as diffusers' latents= argument")
    r.add_argument("--latents-out", help="write the final latents (.npy)")
    r.add_argument("--resume", action="store_true", help="continue from --latents-out checkpoints")
    r.add_argument("--trace", help="write a per-op trace (JSON); its per-op peak windows reset the process's VmHWM, "
                   "so tools outside (time -v) then see less than the peak the summary line reports")
    r.add_argument("--taesd", metavar="FILE", help="tiny VAE decoder (TAESD/TAESDXL/TAEF1 .safetensors or "
                   "diffusers folder): decodes the final image instead of the VAE, and --preview")
    r.add_argument("--preview", metavar="FILE.png", help="rewrite this PNG during denoising (needs --taesd)")
    r.add_argument("--preview-every", type=int, default=1, metavar="N", help="preview every N denoiser calls (1)")
    r.add_argument("--keep-preview", action="store_true", help="keep the preview when the run is interrupted")
    r.add_argument("--scratch-dir", help="where activations that do not fit are spilled (default: the temp folder)")
    r.add_argument(
        "--strict", action="store_true",
        help="fail (no image) at the op that takes the process over the memory budget; by default the "
        "budget guard cuts the rest of the run finer and warns",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("-o", "--output", default="out.png", help="PNG to write (default out.png)")
    _add_common(r)

    i = sub.add_parser(
        "inspect",
        help="show a plan, or a model's matrices without weights: per-image summary, per-layer table",
        description="Per-image summary (calls, GFLOP, weight bytes streamed, FLOP share by op kind, the "
        "largest GEMMs as MxNxK) and per-layer table (op, shapes, MxNxK, GFLOPs, weight/activation MiB, "
        "resident MiB, spills) of a plan. SOURCE is plan.yaml, a preset shipped with streamexec (sd15, "
        "flux-schnell, flux-dev, ...) or a diffusers folder with config.json files and no weights: then the "
        "plan is made from the configs alone, weights assumed in their published dtype (--dtype).",
    )
    i.add_argument("plan", metavar="SOURCE", help="plan.yaml, a preset name, or a folder of configs")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--chart", metavar="PNG",
                   help="write the charts instead of printing: PNG (memory timeline) and PNG with -work "
                   "before the suffix (GFLOP and weight MiB per layer)")
    i.add_argument("--height", type=int, default=None, help="image height (presets/configs; default: the model's)")
    i.add_argument("--width", type=int, default=None, help="image width (presets/configs; default: the model's)")
    i.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    i.add_argument("--batch", type=int, default=1, help="images per prompt (presets/configs)")
    i.add_argument("--cfg-scale", type=float, default=None,
                   help="SD guidance scale; <= 1 plans without classifier-free guidance (presets/configs)")
    i.add_argument("--dtype", default=None, help="stored weight dtype to assume: f32, f16, bf16, fp8 "
                   "(presets/configs; default: the model's published one)")
    i.add_argument("--component", action="append",
                   help="component(s) to show (presets/configs; repeatable; default: all)")
    i.add_argument("--scale-table", action="store_true",
                   help="also the per-image numbers at twice the width and height, and how they scale "
                   "(presets/configs)")
    _add_common(i)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from .models.describe import describe_checkpoint

    budget = parse_budget(args.memory_budget)
    from .weights.roles import open_model

    ckpt = open_model(args, args.model)
    try:
        for name in args.component or ():
            ckpt.component(name)
        if args.check:
            print(describe_checkpoint(ckpt))
            return 0
        return _write_plan(args, ckpt, budget)
    finally:
        ckpt.close()


def _write_plan(args: argparse.Namespace, ckpt, budget: int | None) -> int:
    from pathlib import Path

    from .models.registry import COMPONENTS, RunShape, default_size, is_flux
    from .planner.plan import plan_components, save_plan
    from .runtime.process import measure_baseline
    from .weights.lora import parse_lora_arg

    names = args.component or [n for n in COMPONENTS if n in ckpt.components]
    if not names:
        raise StreamexecError(f"{ckpt.root}: no component streamexec can run (it has: {', '.join(ckpt.components)})")
    configs = {n: dict(c.config or {}) for n, c in ckpt.components.items()}
    side = default_size(configs)
    flux = is_flux(ckpt.components)
    settings = _run_settings(args, flux)
    no_cfg = args.no_cfg or (args.cfg_scale is not None and args.cfg_scale <= 1)
    shape = RunShape(args.height or side, args.width or side, max(1, args.batch), cfg=not (flux or no_cfg))
    dtypes = {t.dtype for c in ckpt.components.values() for t in c.tensors.values()}
    baseline = measure_baseline(dtypes)
    loras = [parse_lora_arg(a) for a in args.lora or []]
    plan = plan_components(ckpt, names, shape, budget, baseline, steps=args.steps, vae_mode=args.vae_mode,
                           variant=args.variant, loras=loras)
    if loras:
        settings["lora"] = [f"{Path(p).resolve()}:{w}" for p, w in loras]
    plan.settings = settings  # what `run` uses unless its own flags say otherwise
    save_plan(plan, args.output)
    for name, cp in plan.components.items():
        f = cp.fit
        print(f"{name:<15} {len(cp.graph.ops):>5} ops  {len(f.schedule.units):>5} units  "
              f"{cp.flops / 1e9:>10.1f} GFLOP  weights {format_size(cp.weight_bytes):>11}  "
              f"peak {format_size(f.peak):>11}  smallest budget {format_size(f.min_budget)}")
    shown = budget if budget in (None, "min", "smallest") else format_size(budget)
    print(f"wrote {args.output}: budget {shown or 'none'}, planned peak "
          f"{format_size(plan.peak)} (process baseline {format_size(baseline)}); "
          f"'streamexec inspect {args.output}' shows every layer")
    return 0


def _run_settings(args: argparse.Namespace, flux: bool) -> dict:
    """The sampler settings ``plan`` records, checked the way a run would check them (against the
    published SD 1.5 / FLUX scheduler config; the model's own may differ) before anything is written."""
    from .pipelines.schedulers import FLUX_SCHNELL_SCHEDULER_CONFIG, SD15_SCHEDULER_CONFIG, make_scheduler

    settings = {k: getattr(args, k) for k in ("sampler", "cfg_scale", "timestep_spacing", "eta")
                if getattr(args, k) is not None}
    if flux and "cfg_scale" in settings:
        raise StreamexecError("FLUX.1 has no classifier-free guidance: --cfg-scale is SD 1.5's")
    if settings.keys() - {"cfg_scale"}:
        make_scheduler(args.sampler, FLUX_SCHNELL_SCHEDULER_CONFIG if flux else SD15_SCHEDULER_CONFIG,
                       args.steps or 1, eta=args.eta, spacing=args.timestep_spacing, image_seq_len=4096)
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from .run import cmd_run as run

    return run(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .planner import inspect, per_image
    from .planner.plan import read_plan_dict

    configs_only = not Path(args.plan).is_file()
    if configs_only:
        plan = _plan_without_weights(args)
    else:
        given = [f"--{k.replace('_', '-')}" for k in ("height", "width", "steps", "cfg_scale", "dtype", "component")
                 if getattr(args, k) is not None] + (["--batch"] if args.batch != 1 else []) + \
                (["--scale-table"] if args.scale_table else [])
        if given:
            raise PlanError(f"{given[0]} is for a preset or a folder of configs; {args.plan} is a plan, made "
                            "for its own sizes ('streamexec plan' makes another)")
        plan = read_plan_dict(args.plan)
    if plan.get("template"):
        raise PlanError(f"{args.plan} is a plan template (it names no model, so it has no layers to show); "
                        f"'streamexec plan MODEL -o plan.yaml' writes a full plan for your files")
    try:
        if args.chart:
            paths = inspect.charts(plan, args.chart)
            print("wrote " + ", ".join(str(p) for p in paths))
            return 0
        summary = per_image.summarize(plan)
        scaled = None
        if args.scale_table:
            big = _plan_without_weights(args, scale=2)
            scaled = per_image.summarize(big)
        if args.json:
            out = inspect.to_json(plan, summary, scaled)
        else:
            out = "\n\n".join([per_image.text(summary)] + ([per_image.scale_text(summary, scaled)] if scaled else [])
                              + [inspect.table(plan)])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PlanError(f"{args.plan}: malformed plan ({type(e).__name__}: {e})") from None
    try:
        print(out, flush=True)
    except BrokenPipeError:  # `streamexec inspect plan.yaml | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _plan_without_weights(args: argparse.Namespace, scale: int = 1) -> dict:
    """The plan dict of a preset or config folder at the sizes the inspect flags ask (× ``scale``)."""
    from .planner.noweights import plan_from_configs
    from .planner.plan import plan_to_dict

    for flag in ("height", "width", "steps", "batch"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise StreamexecError(f"--{flag} must be at least 1 (got {v})")
    cfg = None if args.cfg_scale is None else args.cfg_scale > 1
    plan = plan_from_configs(args.plan, steps=args.steps, dtype=args.dtype, batch=args.batch, cfg=cfg,
                             height=args.height, width=args.width, scale=scale, components=args.component)
    d = plan_to_dict(plan)
    d["checkpoint"]["assumed_dtypes"] = {n: c.graph.config["_assumed_dtype"] for n, c in plan.components.items()}
    return d


COMMANDS = {"plan": cmd_plan, "run": cmd_run, "inspect": cmd_inspect}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except StreamexecError as e:
        if args.debug:
            raise
        print(f"streamexec: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("streamexec: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            raise
        print("streamexec: error: out of memory (try a smaller --memory-budget plan)", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the one place that turns bugs into one line
        if args.debug:
            raise
        print(
            f"streamexec: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _entry()


__all__ = ["main", "build_parser"]
