"""``streamexec run``: a plan (or a model folder, planned on the fly) + a prompt → a PNG.

Resolves where the model is and what the run settings are (command line > plan > the model's
defaults), opens the text-to-image pipeline inside the memory budget, shows progress, writes the
image atomically with its parameters, and keeps per-step latents checkpoints for ``--resume``
(latents, sampler state and a .json with the step and both digests, written with SIGINT/SIGTERM
held off; ``--resume`` checks the digests).
Ctrl-C / SIGTERM leave no partial PNG and no scratch files.

Every component runs under the budget guard (``runtime/guard.py``): if the process goes over the
budget anyway (a planner mistake), the rest of the run is cut finer and a ``warning: budget
guard: ...`` line says so; with ``--strict`` the run stops at that op instead (one error line
naming it, exit 2, no PNG, the spill folder removed), and the process peak is checked once more
after the pipeline (tokenizer, PNG encoding). VmHWM is never reset (except by ``--trace``'s per-op
windows, which says so): the summary line's peak is the process's, start-up and JIT included, and
a run that went over the budget anywhere says so in a warning line (``--strict``: fails)."""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import PlanError, StreamexecError
from .sizes import format_size, parse_budget


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _is_plan_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (".yaml", ".yml")


def resolve(args: argparse.Namespace) -> tuple[Path, dict, dict, dict | None]:
    """(model path, run settings from the plan, memory settings from the plan, the plan itself
    when it is a full plan whose schedules the run should follow). A plan made with the role flags
    (--vae, --clip-l, ...) puts its files back on ``args`` unless the command line gives them."""
    from .weights.roles import open_model, role_files

    if args.plan is None:
        if not role_files(args).get("diffusion_model") and not args.model:
            raise StreamexecError("give PLAN, a model file/folder, or --diffusion-model FILE")
        return (Path(args.model) if args.model else None), {}, {}, None
    target = Path(args.plan)
    if not _is_plan_file(target):
        if not target.exists():
            raise StreamexecError(f"{target}: no such plan or model")
        return Path(args.model or target), {}, {}, None
    from .planner.plan import check_checkpoint, read_plan_dict

    d = read_plan_dict(target)
    run = dict(d.get("run") or {})
    mem = dict(d.get("memory") or {})
    for k in ("height", "width", "steps", "batch"):
        if run.get(k) is not None and (isinstance(run[k], bool) or not isinstance(run[k], int) or run[k] < 1):
            raise PlanError(f"{target}: run.{k} must be a positive whole number, not {run[k]!r}")
    for k, kind in (("cfg_scale", "a number"), ("eta", "a number"), ("sampler", "a name"),
                    ("timestep_spacing", "a name")):
        v = run.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, str if kind == "a name" else (int, float))):
            raise PlanError(f"{target}: run.{k} must be {kind}, not {v!r}")
    if d.get("template"):
        name = d.get("model")
        if args.model:
            return Path(args.model), run, mem, None
        if name == "demo":
            from .pipelines.demo import ensure_demo_model

            return ensure_demo_model(_log), run, mem, None
        raise PlanError(f"{target} is a plan template: say which model it runs with --model DIR")
    root = args.model or (d.get("checkpoint") or {}).get("root")
    if not root:
        raise PlanError(f"{target}: the plan names no model; pass --model DIR")
    roles = (d.get("checkpoint") or {}).get("roles") or {}
    if not isinstance(roles, dict):
        raise PlanError(f"{target}: checkpoint.roles must map roles to files")
    for role, path in roles.items():
        if getattr(args, str(role), None) is None:
            setattr(args, str(role), str(path))
    args.variant = (d.get("checkpoint") or {}).get("variant")
    ckpt = open_model(args, root)
    try:
        check_checkpoint(d, ckpt)
    finally:
        ckpt.close()
    return Path(root), run, mem, d


def _budget(args: argparse.Namespace, mem: dict):
    if args.memory_budget is not None:
        return parse_budget(args.memory_budget)
    if mem.get("budget") is not None:  # templates say it as a size ("1G")
        return parse_budget(str(mem["budget"]))
    return mem.get("budget_bytes")


def _read_image(path: str, width: int | None, height: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if width and height and im.size != (width, height):
                im = im.resize((width, height), Image.LANCZOS)
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as e:
        raise StreamexecError(f"{path}: cannot read the init image ({e})") from None


@contextmanager
def signals_held():
    """Hold SIGINT/SIGTERM off while a resume checkpoint's files are written: one that arrives
    meanwhile is delivered right after (taking the usual Ctrl-C clean-up path), never between two
    of the files. Deferred in Python's handlers, not with ``pthread_sigmask``: a mask covers only the
    calling thread, and the kernel hands a process-wide signal to any thread (BLAS, prefetch) that
    does not block it, which then runs the Python handler in the main thread all the same."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set handlers (and it is the one that runs them)
        return
    pending: list[int] = []

    def defer(signum, frame):
        pending.append(signum)

    old = {s: signal.signal(s, defer) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if pending:
            s = pending[0]
            handler = old[s]
            if callable(handler):
                handler(s, None)  # e.g. KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


def array_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``arrays`` (not over the file format)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_checkpoint(path: str, step: int, latents: np.ndarray, state: dict, params: dict) -> None:
    """The ``--latents-out`` checkpoint after denoiser call ``step``: the sampler state (if any), the
    latents and a .json naming the step with the digests of both, written with signals held off."""
    from .pipelines.png import save_npy, save_npz, save_text

    meta = {"step": step, "parameters": params, "latents_sha256": array_digest({"latents": latents}),
            "state_sha256": array_digest(state) if state else None}
    with signals_held():
        if state:
            save_npz(path + ".state.npz", state)
        save_npy(path, latents)
        save_text(path + ".json", json.dumps(meta, default=str))


def _resume_state(args: argparse.Namespace, params: dict) -> tuple[int, np.ndarray | None, dict | None]:
    if not args.resume:
        return 0, None, None
    if not args.latents_out:
        raise StreamexecError("--resume continues from the checkpoints that --latents-out writes: pass the same "
                              "--latents-out")
    lat, meta = Path(args.latents_out), Path(args.latents_out + ".json")
    state_file = Path(args.latents_out + ".state.npz")
    if not (lat.is_file() and meta.is_file()):
        _log(f"nothing to resume at {lat}: starting from step 0")
        return 0, None, None
    try:
        info = json.loads(meta.read_text())
        if not isinstance(info, dict):
            raise ValueError(f"{meta.name} is not a JSON object")
        latents = np.load(lat, allow_pickle=False)
        if not isinstance(latents, np.ndarray):
            raise ValueError("not a single array")
        want_state = info.get("state_sha256")
        state = {}
        if want_state and state_file.is_file():  # a state file the .json does not name is stale: unused
            with np.load(state_file, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise StreamexecError(f"{lat}: cannot read the resume checkpoint ({e})") from None
    saved = json.loads(json.dumps(info.get("parameters") or {}))
    now = json.loads(json.dumps(params, default=str))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise StreamexecError(f"{lat} was written by a different run ({', '.join(diff)} differ); not resuming")
    bad = []
    if info.get("latents_sha256") != array_digest({"latents": latents}):
        bad.append(lat.name)
    if want_state and (not state or want_state != array_digest(state)):
        bad.append(state_file.name)
    if bad:
        raise StreamexecError(f"{lat}: checkpoint files disagree ({' and '.join(bad)} "
                              f"{'does' if len(bad) == 1 else 'do'} not match the digest in {meta.name}); "
                              "not resuming")
    step = int(info.get("step", -1))
    _log(f"resuming after denoiser call {step + 1}")
    return step + 1, latents, state


def follow_plan(pipe, plan: dict) -> None:
    """Give each component the plan's graph and schedule: calls with the plan's shapes run exactly
    as planned (and as `streamexec inspect` shows)."""
    from .planner.plan import check_weights, graph_from_dict

    base = int((plan.get("memory") or {}).get("baseline_bytes") or 0)
    for name, c in (plan.get("components") or {}).items():
        if name in pipe.models:
            graph, schedule, _ = graph_from_dict(name, c)
            check_weights(graph, pipe.checkpoint, name)
            pipe.models[name].use_plan(graph, schedule, base)


def check_budget_first(pipe, params: dict, budget) -> None:
    """Fit every component the run needs before anything runs: a budget too small for the
    denoiser fails now (naming the smallest that fits), not after the text encoders."""
    if budget is None:
        return
    from .models.registry import RunShape, build_component
    from .planner.fit import fit_schedule, weight_table

    configs = {n: dict(c.config or {}) for n, c in pipe.checkpoint.components.items()}
    shape = RunShape(int(params["height"]), int(params["width"]), 1,
                     text_len=params.get("max_sequence_length"),
                     cfg=pipe.kind != "flux" and float(params.get("cfg_scale") or 0) > 1)
    for name, m in pipe.models.items():
        table = weight_table(m.store)

        def info(key: str, table=table):
            w = table.get(key)
            return None if w is None else (w.shape, w.dtype)

        graph = build_component(name, configs.get(name, {}), info, shape, configs, str(pipe.root))
        if m.baseline is None:
            from .api import process_baseline

            m.baseline = process_baseline({t.dtype for t in m.store.tensors.values()})
        fit_schedule(graph, table, budget, m.baseline)


def _first(flag, planned):
    """The command line's value, else the plan's (a flag of 0 still counts)."""
    return flag if flag is not None else planned


def _check_preview_flags(args: argparse.Namespace) -> None:
    """--preview needs --taesd, a file name and --preview-every >= 1 (refused before anything runs)."""
    if args.preview_every < 1:
        raise StreamexecError(f"--preview-every {args.preview_every}: give a number of steps >= 1")
    if args.preview and not args.taesd:
        raise StreamexecError("--preview needs a tiny decoder: give --taesd FILE (e.g. taesd_decoder.safetensors)")
    if args.preview and Path(args.preview).is_dir():
        raise StreamexecError(f"--preview {args.preview} is a folder; give a .png file name")


def cmd_run(args: argparse.Namespace) -> int:
    from .pipelines.generate import Request, open_pipeline
    from .pipelines.png import save_npy, save_png, save_text
    from .pipelines.progress import Progress
    from .weights.lora import lora_hashes, parse_lora_arg, prompt_loras
    from .weights.roles import role_files

    t0 = time.perf_counter()
    model, run, mem, plan = resolve(args)
    budget = _budget(args, mem)
    prompt, tag_loras = prompt_loras(args.prompt, getattr(args, "lora_dir", None))
    loras = [parse_lora_arg(a) for a in getattr(args, "lora", None) or run.get("lora") or []] + tag_loras
    req = Request(
        prompt=prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        steps=args.steps or run.get("steps"), cfg_scale=_first(args.cfg_scale, run.get("cfg_scale")),
        guidance=args.guidance, sampler=args.sampler or run.get("sampler"), karras=args.karras,
        height=args.height or run.get("height"), width=args.width or run.get("width"), strength=args.strength,
        timestep_spacing=args.timestep_spacing or run.get("timestep_spacing"), eta=_first(args.eta, run.get("eta")),
    )
    if args.init_image:
        req.init_image = _read_image(args.init_image, req.width, req.height)
    if args.latents_in:
        try:
            req.latents_in = np.load(args.latents_in, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise StreamexecError(f"{args.latents_in}: cannot read latents ({e})") from None
    out = Path(args.output)
    if out.is_dir():
        raise StreamexecError(f"{out} is a folder; give a .png file name with -o")
    _check_preview_flags(args)

    def on_term(signum, frame):  # SIGTERM takes the same clean-up path as Ctrl-C
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    progress = Progress(budget if isinstance(budget, int) else None, quiet=args.quiet)
    pipe = open_pipeline(model, memory_budget=budget, tokenizer=args.tokenizer, scratch_dir=args.scratch_dir,
                         files=role_files(args), variant=getattr(args, "variant", None))
    model = pipe.root
    previewed: list[int] = []  # denoiser calls a preview was written after
    try:
        if args.taesd:
            pipe.use_tiny_decoder(args.taesd)
        if loras:
            pipe.set_loras(loras)
        if not args.quiet:
            _log(f"{pipe.kind} pipeline from {model}, budget "
                 f"{format_size(budget) if isinstance(budget, int) else budget or 'none'}")
        params_probe = pipe.describe(req)
        if plan is not None and args.memory_budget is None:
            follow_plan(pipe, plan)
        check_budget_first(pipe, params_probe, budget)
        start_step, start_latents, start_state = _resume_state(args, params_probe)
        if args.trace:
            _log("note: --trace resets VmHWM around every op (per-op peaks); the summary line keeps the process "
                 "peak, tools outside the process (time -v, getrusage) see less")
        for m in pipe.models.values():
            m.trace = bool(args.trace)
            m.strict = bool(args.strict)  # the guard aborts at the op that overshoots

        def on_step(i: int, latents: np.ndarray) -> None:
            if args.latents_out:  # a resumable checkpoint after every denoiser call
                write_checkpoint(args.latents_out, i, latents, pipe.resume_state(), params_probe)
            if args.preview and (i + 1) % args.preview_every == 0:
                save_png(args.preview, pipe.preview(latents), {**params_probe, "preview_step": i + 1})
                previewed.append(i)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = pipe(req, progress=progress, on_step=on_step, start_step=start_step,
                              start_latents=start_latents, start_state=start_state)
            finally:  # also when it fails: what the budget guard did before a --strict stop
                for w in caught:
                    _log(f"warning: {w.message}")
        if loras:  # as AUTOMATIC1111 writes them
            result.parameters["lora_hashes"] = lora_hashes(loras)
        if isinstance(budget, int):  # outside the ops too (tokenizer, PNG encoding)
            from .runtime.guard import process_peak

            if process_peak() > budget:
                said = any("over the budget" in str(w.message) for w in caught)
                if args.strict:
                    raise StreamexecError(f"--strict: peak RSS {format_size(process_peak())} exceeded the budget "
                                          f"{format_size(budget)}; image not written")
                if not said:
                    _log(f"warning: budget guard: peak RSS {format_size(process_peak())} over the budget "
                         f"{format_size(budget)} outside the model calls (tokenizer, scheduler, PNG encoding)")
        if args.latents_out:
            save_npy(args.latents_out, result.latents)
        save_png(out, result.image, result.parameters)
        if args.trace:
            traces = {name: m.last_executor.trace_json() for name, m in pipe.models.items() if m.last_executor}
            save_text(args.trace, json.dumps({"parameters": result.parameters, "components": traces}, default=str))
            _log(f"wrote {args.trace}: per-op time, weight bytes, RSS after and peak RSS of each component's last call")
    except BaseException:  # Ctrl-C or a failure: a half-made preview is not the picture, gone unless kept
        if previewed and not args.keep_preview:  # (only a preview this run wrote)
            Path(args.preview).unlink(missing_ok=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        pipe.close()
    # --trace's per-op windows reset VmHWM: they note the peak before they do
    from .runtime.guard import process_peak

    progress.peak_override = process_peak()
    print(progress.summary(result.stage_seconds, time.perf_counter() - t0, result.bytes_streamed, str(out)))
    if "demo" in str(model) and "demo-v" in str(model):
        print("note: the demo model has random weights, so the picture is noise. For real images: "
              "streamexec plan /path/to/stable-diffusion-v1-5 -o plans/mine.yaml && streamexec run plans/mine.yaml "
              "--prompt '...'")
    return 0
