"""What one image costs, from a plan's own numbers: per component and for the whole image, the
calls per image (the denoiser once per step, text encoders and VAE once) and evaluations per
image (with classifier-free guidance each UNet/CLIP call carries the prompt and the negative
prompt: UNet × steps × 2), GFLOP per call and per image, weight bytes streamed per image, the
FLOP share by op kind, the largest GEMMs as M×N×K with what they are (also as the fused products
BFL's files store), and the FLOP-weighted median M, N and K: "how big are the real matrices"."""

from __future__ import annotations

import re
from collections import defaultdict

from ..models.registry import default_steps
from ..sizes import format_size

DENOISERS = ("unet", "transformer")
KINDS = {"linear": "linear", "mlp": "linear", "parallel_mlp": "linear", "conv2d": "conv",
         "attention": "attention", "prefix_attention": "attention", "group_norm": "norm", "layer_norm": "norm",
         "rms_norm": "norm", "head_norm": "norm"}
_BLOCK = re.compile(r"^(.*(?:blocks|layers|block|attentions|resnets)\.\d+)\.")
_INDEX = re.compile(r"((?:blocks|layers|block|resnets|attentions)\.)\d+")


def pattern(name: str) -> str:
    """An op name with its block/layer indices as ``*`` (``single_transformer_blocks.*.attn.to_q``)."""
    return _INDEX.sub(r"\g<1>*", name)


def _gemm_names(o: dict, count: int) -> list[str]:
    """What each GEMM of an op multiplies by: its weight's name (attention: scores and output)."""
    w = o.get("weights") or {}
    if o["kind"] in ("attention", "prefix_attention"):
        return [f"{o['name']} (q·kT)", f"{o['name']} (p·v)"][:count]
    keys = [w[r] for r in ("weight", "up", "up_mul", "down") if r in w]
    names = [k[: -len(".weight")] if k.endswith(".weight") else k for k in keys]
    return (names + [o["name"]] * count)[:count]


def _weighted_median(pairs: list[tuple[int, int]]) -> int:
    """The value at half the total weight of (value, weight) pairs."""
    pairs = sorted(pairs)
    total = sum(w for _, w in pairs)
    acc = 0
    for v, w in pairs:
        acc += w
        if 2 * acc >= total:
            return v
    return 0


def steps_of(plan: dict) -> tuple[int, bool]:
    """(denoising steps, whether the plan recorded them rather than the pipeline default)."""
    steps = (plan.get("run") or {}).get("steps")
    if steps:
        return int(steps), True
    return default_steps({n: c.get("config") or {} for n, c in plan["components"].items()}), False


def component_summary(name: str, c: dict, steps: int, images: int) -> dict:
    """The per-call and per-image numbers of one component of a plan."""
    calls = steps if name in DENOISERS else 1
    flops = sum(o.get("flops", 0) for o in c["ops"])
    wbytes = sum(o.get("weight_bytes", 0) for o in c["ops"])
    by_kind: dict[str, int] = defaultdict(int)
    gemms: dict[tuple, dict] = {}
    fused: dict[tuple, dict] = {}
    mnk: list[tuple[int, int, int, int]] = []
    for o in c["ops"]:
        by_kind[KINDS.get(o["kind"], "other")] += o.get("flops", 0)
        gl = o.get("gemm") or []
        whats = _gemm_names(o, len(gl))
        for j, (m, n, k, count) in enumerate(gl):
            f = 2 * m * n * k * count
            mnk.append((m, n, k, f))
            g = gemms.setdefault((m, n, k, count, pattern(whats[j])), {"ops": 0, "flops": 0})
            g["ops"] += 1
            g["flops"] += f
            shares_input = o["kind"] == "linear" or (o["kind"] in ("mlp", "parallel_mlp") and j < len(gl) - 1)
            if shares_input and count == 1:
                block = _BLOCK.match(whats[j])
                where = block.group(1) if block else ""
                e = fused.setdefault((o["inputs"][0], m, k, where), {"m": m, "k": k, "n": 0, "names": [],
                                                                      "block": pattern(where) or "(top level)"})
                e["n"] += n
                e["names"].append(whats[j][len(where) + 1:] if where else whats[j])
    per_image = calls / max(1, images)
    top = sorted(gemms.items(), key=lambda kv: (-kv[0][0] * kv[0][1] * kv[0][2] * kv[0][3], kv[0][4]))[:10]
    merged: dict[tuple, dict] = {}
    for e in fused.values():
        if len(e["names"]) > 1:
            key = (e["m"], e["n"], e["k"], e["block"], " + ".join(e["names"]))
            merged[key] = {"count": merged.get(key, {"count": 0})["count"] + 1}
    return {
        "component": name, "model": c.get("model"), "calls_per_image": per_image,
        "batch_per_call": _batch(c), "evaluations_per_image": per_image * _batch(c),
        "gflop_per_call": flops / 1e9, "gflop_per_image": flops * per_image / 1e9,
        "weight_bytes_per_call": wbytes, "weight_bytes_per_image": wbytes * per_image,
        "flop_share": {k: v / flops for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])} if flops else {},
        "largest_gemms": [{"m": m, "n": n, "k": k, "count": cnt, "what": pat, "ops": g["ops"]}
                          for (m, n, k, cnt, pat), g in top],
        "fused_gemms": [{"m": m, "n": n, "k": k, "what": f"{prefix}: {names}", "ops": v["count"]}
                        for (m, n, k, prefix, names), v in sorted(merged.items(), key=_by_size)][:5],
        "typical_mnk": [_weighted_median([(t[i], t[3]) for t in mnk]) for i in range(3)] if mnk else None,
        "_mnk": mnk, "_by_kind": dict(by_kind), "_flops": flops,
    }


def _by_size(kv: tuple) -> int:
    m, n, k = kv[0][:3]
    return -m * n * k


def _batch(c: dict) -> int:
    """The batch of a component's first input (2 × images for SD 1.5's UNet/CLIP with guidance)."""
    shapes = [v.get("shape") for v in (c.get("inputs") or {}).values() if v.get("shape")]
    return int(shapes[0][0]) if shapes and len(shapes[0]) > 1 else 1


def summarize(plan: dict) -> dict:
    """Per component and for the whole image (components weighted by their calls per image)."""
    steps, recorded = steps_of(plan)
    images = int((plan.get("run") or {}).get("batch") or 1)
    comps = {n: component_summary(n, c, steps, images) for n, c in plan["components"].items()}
    kinds: dict[str, float] = defaultdict(float)
    mnk: list[tuple[int, int, int, float]] = []
    for s in comps.values():
        for k, v in s["_by_kind"].items():
            kinds[k] += v * s["calls_per_image"]
        mnk += [(m, n, k, f * s["calls_per_image"]) for m, n, k, f in s["_mnk"]]
    total = sum(kinds.values())
    whole = {"gflop_per_image": sum(s["gflop_per_image"] for s in comps.values()),
             "weight_bytes_per_image": sum(s["weight_bytes_per_image"] for s in comps.values()),
             "flop_share": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])} if total else {},
             "typical_mnk": [_weighted_median([(t[i], round(t[3])) for t in mnk]) for i in range(3)] if mnk else None}
    for s in comps.values():
        for k in ("_mnk", "_by_kind", "_flops"):
            s.pop(k)
    run = plan.get("run") or {}
    return {"height": run.get("height"), "width": run.get("width"), "images": images, "steps": steps,
            "steps_recorded": recorded, "cfg": bool(run.get("cfg")), "components": comps, "image": whole}


def _share(d: dict) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in d.items() if v >= 0.005)


def text(s: dict) -> str:
    """The summary for a terminal."""
    steps = f"{s['steps']} steps" + ("" if s["steps_recorded"] else " (the pipeline's default; --steps to change)")
    cfg = ", classifier-free guidance (each denoiser call evaluates prompt and negative prompt)" if s["cfg"] else ""
    lines = [f"per image at {s['width']}x{s['height']}, {steps}{cfg}",
             f"{'component':<15} {'calls/image':>11} {'evals/image':>11} {'GFLOP/call':>11} {'GFLOP/image':>12} "
             f"{'weights/image':>14}  typical MxNxK (FLOP-weighted median)"]
    for n, c in s["components"].items():
        t = c["typical_mnk"]
        lines.append(f"{n:<15} {c['calls_per_image']:>11g} {c['evaluations_per_image']:>11g} "
                     f"{c['gflop_per_call']:>11.1f} {c['gflop_per_image']:>12.1f} "
                     f"{format_size(c['weight_bytes_per_image']):>14}  {'x'.join(map(str, t)) if t else '-'}")
    w = s["image"]
    t = w["typical_mnk"]
    lines.append(f"{'whole image':<15} {'':>11} {'':>11} {'':>11} {w['gflop_per_image']:>12.1f} "
                 f"{format_size(w['weight_bytes_per_image']):>14}  {'x'.join(map(str, t)) if t else '-'}")
    lines.append(f"FLOP share, whole image: {_share(w['flop_share'])}")
    for n, c in s["components"].items():
        lines.append(f"-- {n}: FLOP share {_share(c['flop_share'])}; largest GEMMs (M x N x K):")
        for g in c["largest_gemms"]:
            cnt = f" x{g['count']} (batch x heads)" if g["count"] > 1 else ""
            lines.append(f"   {g['m']:>7} x {g['n']:>6} x {g['k']:>6}{cnt}  {g['what']}  ({g['ops']} ops)")
        for g in c["fused_gemms"]:
            lines.append(f"   {g['m']:>7} x {g['n']:>6} x {g['k']:>6}  one input, fusable: {g['what']}"
                         f"  ({g['ops']} ops)")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"x{b / a:.2f}" if a else "-"


def scale_text(a: dict, b: dict) -> str:
    """How the per-image numbers scale from summary ``a`` to ``b`` (the same model at another size),
    stated from the two plans' own numbers, per component and op kind."""
    px = (b["width"] * b["height"]) / (a["width"] * a["height"])
    lines = [f"scaling {a['width']}x{a['height']} -> {b['width']}x{b['height']} (pixels x{px:g}): tokens and "
             f"conv rows grow as H·W (x{px:g}), attention among image tokens as (H·W)² (x{px * px:g}); text-side "
             "work stays; weights streamed do not change",
             f"{'component':<15} {'GFLOP/image':>12} {'at 2x side':>12} {'ratio':>7}  typical M       by op kind"]
    for n, ca in a["components"].items():
        cb = b["components"].get(n)
        if cb is None:
            continue
        kinds = ", ".join(
            f"{k} {_ratio(ca['gflop_per_image'] * v, cb['gflop_per_image'] * cb['flop_share'].get(k, 0))}"
            for k, v in ca["flop_share"].items() if v >= 0.005)
        ma, mb = (ca["typical_mnk"] or [0])[0], (cb["typical_mnk"] or [0])[0]
        lines.append(f"{n:<15} {ca['gflop_per_image']:>12.1f} {cb['gflop_per_image']:>12.1f} "
                     f"{_ratio(ca['gflop_per_image'], cb['gflop_per_image']):>7}  {ma:>6} -> {mb:<6}  {kinds}")
    wa, wb = a["image"], b["image"]
    lines.append(f"{'whole image':<15} {wa['gflop_per_image']:>12.1f} {wb['gflop_per_image']:>12.1f} "
                 f"{_ratio(wa['gflop_per_image'], wb['gflop_per_image']):>7}")
    return "\n".join(lines)
