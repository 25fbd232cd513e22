"""``streamexec inspect``: what a plan will do, per layer — the real matrices it multiplies
(M×N×K), FLOPs, weight and activation bytes, what is resident at each op and why — as a table,
JSON, or a memory-timeline chart (PNG, drawn with pillow). Works from plan.yaml alone."""

from __future__ import annotations

import json
from pathlib import Path

from ..sizes import format_size

MIB = 1 << 20


def _notes(o: dict) -> str:
    parts = []
    p = o.get("params") or {}
    if "row_chunk" in p:
        parts.append(f"rows {p['row_chunk']}")
    if "panel_rows" in p:
        parts.append(f"panel {p['panel_rows']}")
    if "q_tile" in p or "k_tile" in p:
        parts.append(f"tile q{p.get('q_tile', '-')}/k{p.get('k_tile', '-')}")
    if "band_rows" in p:
        parts.append(f"band {p['band_rows']}")
    if o.get("reload_before"):
        parts.append(f"reload {len(o['reload_before'])}")
    if o.get("stream_inputs"):
        parts.append(f"stream {len(o['stream_inputs'])}")
    if o.get("output_on_disk"):
        parts.append("out->disk")
    if "ooc_rows" in p:
        parts.append(f"bands of {p['ooc_rows']} rows")
    if o.get("spill_after"):
        parts.append(f"spill {len(o['spill_after'])}")
    return ", ".join(parts)


def _gemm(o: dict) -> str:
    out = []
    for m, n, k, count in o.get("gemm") or []:
        out.append(f"{m}x{n}x{k}" + (f" x{count}" if count > 1 else ""))
    return " + ".join(out)


def rows(plan: dict) -> list[dict]:
    """One row per op of every component, in run order."""
    out = []
    for comp, c in plan["components"].items():
        unit_of = {}
        for u in c.get("units") or []:
            for i in range(u["ops"][0], u["ops"][1] + 1):
                unit_of[i] = u
        for o in c["ops"]:
            mem = o.get("memory") or {}
            u = unit_of.get(o["i"], {})
            out.append({
                "component": comp, "i": o["i"], "name": o["name"], "kind": o["kind"], "shape": o["shape"],
                "gemm": _gemm(o), "gflops": o.get("flops", 0) / 1e9, "weight_bytes": o.get("weight_bytes", 0),
                "out_bytes": o.get("out_bytes", 0), "resident_bytes": mem.get("total", 0), "memory": mem,
                "prefetch": u.get("prefetch", ""), "unit_start": bool(u) and u["ops"][0] == o["i"],
                "unit_choice": u.get("choice", ""), "unit_seconds": u.get("seconds"),
                "params": o.get("params") or {}, "spill_after": o.get("spill_after") or [],
                "reload_before": o.get("reload_before") or [], "notes": _notes(o),
            })
    return out


def summary(plan: dict) -> dict:
    comps = {n: dict(c.get("summary") or {}) for n, c in plan["components"].items()}
    return {"checkpoint": plan["checkpoint"]["root"], "run": plan["run"], "memory": plan["memory"],
            "components": comps}


def to_json(plan: dict, per_image: dict | None = None, scaled: dict | None = None) -> str:
    """The plan's summary, the per-image numbers (and at twice the side, ``scaled``), every op."""
    out: dict = {"summary": summary(plan)}
    if per_image is not None:
        out["per_image"] = per_image
    if scaled is not None:
        out["per_image_at_2x"] = scaled
    out["ops"] = rows(plan)
    return json.dumps(out, indent=1)


def table(plan: dict) -> str:
    """The per-layer table plus totals, for a terminal."""
    lines = []
    mem = plan["memory"]
    run = plan["run"]
    budget = mem.get("budget_bytes")
    lines.append(f"plan for {plan['checkpoint']['root']}  ({run['width']}x{run['height']}, batch {run['batch']})")
    assumed = plan["checkpoint"].get("assumed_dtypes")
    if assumed:
        lines.append("no weights read: shapes from the configs, stored as "
                     + ", ".join(f"{n} {t}" for n, t in assumed.items())
                     + "; the process baseline is assumed, not measured")
    lines.append(f"budget {format_size(budget) if budget else 'none'}   planned peak {format_size(mem['peak_bytes'])}"
                 f"   smallest budget that fits {format_size(mem['min_budget_bytes'])}"
                 f"   process baseline {format_size(mem['baseline_bytes'])}")
    head = f"{'#':>5} {'op':<52} {'kind':<14} {'output':<20} {'M x N x K':<30} {'GFLOP':>8} {'W MiB':>8} " \
           f"{'out MiB':>8} {'plan MiB':>9}  notes"
    for comp, c in plan["components"].items():
        s = c.get("summary") or {}
        lines.append("")
        lines.append(f"== {comp} ({c.get('model')}, {c.get('mode', 'forward')}): {s.get('ops')} ops in "
                     f"{s.get('units')} streaming units, {s.get('flops', 0) / 1e9:.1f} GFLOP, "
                     f"{format_size(s.get('weight_bytes', 0))} of weights, peak {format_size(s.get('peak_bytes', 0))}, "
                     f"{s.get('spills', 0)} spills"
                     + (f", predicted {s['predicted_seconds']:.2f} s per call" if "predicted_seconds" in s else ""))
        lines.append(head)
        for r in rows({"components": {comp: c}}):
            name = r["name"] if len(r["name"]) <= 52 else "…" + r["name"][-51:]
            shape = "x".join(str(v) for v in r["shape"])
            mark = "" if not r["unit_start"] else _unit_mark(r)
            lines.append(
                f"{r['i']:>5} {name:<52} {r['kind'][:14]:<14} {shape:<20} {r['gemm'][:30]:<30} {r['gflops']:>8.2f} "
                f"{r['weight_bytes'] / MIB:>8.2f} {r['out_bytes'] / MIB:>8.2f} {r['resident_bytes'] / MIB:>9.1f}  "
                f"{mark}{r['notes']}"
            )
    total_flops = sum(c.get("summary", {}).get("flops", 0) for c in plan["components"].values())
    total_w = sum(c.get("summary", {}).get("weight_bytes", 0) for c in plan["components"].values())
    lines.append("")
    lines.append(f"total: {total_flops / 1e9:.1f} GFLOP per pass, {format_size(total_w)} of weights streamed per pass"
                 + (f", {run['steps']} denoising steps" if run.get("steps") else ""))
    lines.append("plan MiB = what the planner charges at that op: process baseline + resident weights (+ the next "
                 "unit's when prefetched) + live activations + output + kernel scratch")
    lines.append("[unit: whole|split, populate|readahead, s] = the option the fit chose for the streaming unit "
                 "starting there and its predicted seconds (planner/costs.py)")
    return "\n".join(lines)


def _unit_mark(r: dict) -> str:
    """``[unit: whole, populate, 0.012 s]`` for a unit's first op (plans without choices: the mode)."""
    if r.get("unit_choice"):
        secs = r.get("unit_seconds")
        return f"[unit: {r['unit_choice']}" + (f", {secs:.3f} s" if secs is not None else "") + "] "
    return "" if r["prefetch"] == "populate" else f"[{r['prefetch']}] "


_LAYERS = [("baseline", (150, 150, 150)), ("weights", (52, 101, 164)), ("prefetch", (114, 159, 207)),
           ("activations", (78, 154, 6)), ("output", (245, 121, 0)), ("scratch", (204, 0, 0))]


def chart(plan: dict, path: str | Path, width: int = 1400, height: int = 560) -> None:
    """Memory timeline: stacked bytes per op (baseline, weights, prefetch, activations, output,
    scratch) across the components in run order, with the budget line."""
    from PIL import Image, ImageDraw

    rs = rows(plan)
    if not rs:
        raise ValueError("the plan has no ops")
    budget = plan["memory"].get("budget_bytes")
    top = max([r["resident_bytes"] for r in rs] + ([budget] if budget else [])) * 1.08
    left, right, up, down = 80, 20, 40, 70
    pw, ph = width - left - right, height - up - down
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    n = len(rs)

    def y(v: float) -> float:
        return up + ph - ph * v / top

    for k, r in enumerate(rs):
        x0 = left + pw * k / n
        x1 = max(x0 + 1, left + pw * (k + 1) / n)
        acc = 0
        for key, color in _LAYERS:
            v = r["memory"].get(key, 0)
            if v > 0:
                d.rectangle([x0, y(acc + v), x1, y(acc)], fill=color)
            acc += v
    # axes and grid
    d.line([left, up, left, up + ph, left + pw, up + ph], fill="black")
    step = _nice_step(top / MIB)
    v = 0.0
    while v * MIB <= top:
        yy = y(v * MIB)
        d.line([left - 4, yy, left + pw, yy], fill=(225, 225, 225))
        d.text((4, yy - 6), f"{v:g} MiB", fill="black")
        v += step
    if budget:
        d.line([left, y(budget), left + pw, y(budget)], fill=(255, 0, 0), width=2)
        d.text((left + pw - 180, y(budget) - 14), f"budget {format_size(budget)}", fill=(200, 0, 0))
    # component boundaries
    start = 0
    for comp in plan["components"]:
        count = sum(1 for r in rs if r["component"] == comp)
        x = left + pw * start / n
        d.line([x, up, x, up + ph], fill=(80, 80, 80))
        d.text((x + 4, up + ph + 6), f"{comp} ({count} ops)", fill="black")
        start += count
    d.text((left, 10), f"memory timeline: {plan['checkpoint']['root']}  (peak "
                       f"{format_size(plan['memory']['peak_bytes'])})", fill="black")
    lx = left
    for key, color in _LAYERS:
        d.rectangle([lx, height - 24, lx + 12, height - 12], fill=color)
        d.text((lx + 16, height - 25), "process + margin" if key == "baseline" else key, fill="black")
        lx += 150
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)


def charts(plan: dict, path: str | Path) -> list[Path]:
    """Both charts: the memory timeline at ``path`` and the work per layer at ``path`` with
    ``-work`` before its suffix. Returns the two paths."""
    path = Path(path)
    work = path.with_name(f"{path.stem}-work{path.suffix or '.png'}")
    chart(plan, path)
    work_chart(plan, work)
    return [path, work]


def work_chart(plan: dict, path: str | Path, width: int = 1400, height: int = 620) -> None:
    """Where the time and the bytes go: GFLOP per op (top) and weight MiB per op (bottom), one bar
    per op across the components in run order (per call of each component)."""
    from PIL import Image, ImageDraw

    rs = rows(plan)
    if not rs:
        raise ValueError("the plan has no ops")
    left, right, up, gap, down = 80, 20, 40, 40, 50
    pw = width - left - right
    ph = (height - up - gap - down) // 2
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    n = len(rs)
    panels = [("GFLOP per op", [r["gflops"] for r in rs], "", (52, 101, 164), up),
              ("weight MiB per op", [r["weight_bytes"] / MIB for r in rs], " MiB", (245, 121, 0), up + ph + gap)]
    for title, values, unit, color, y0 in panels:
        top = max(values) * 1.08 or 1.0
        d.line([left, y0, left, y0 + ph, left + pw, y0 + ph], fill="black")
        step = _nice_step(top)
        v = 0.0
        while v <= top:
            yy = y0 + ph - ph * v / top
            d.line([left - 4, yy, left + pw, yy], fill=(225, 225, 225))
            d.text((4, yy - 6), f"{v:g}{unit}", fill="black")
            v += step
        for k, val in enumerate(values):
            if val > 0:
                x0 = left + pw * k / n
                d.rectangle([x0, y0 + ph - ph * val / top, max(x0 + 1, left + pw * (k + 1) / n), y0 + ph], fill=color)
        d.text((left + 4, y0 - 14), f"{title} (total {sum(values):,.1f}{unit or ' GFLOP'} per call of each component)",
               fill="black")
    start = 0
    for comp in plan["components"]:
        count = sum(1 for r in rs if r["component"] == comp)
        x = left + pw * start / n
        d.line([x, up, x, height - down], fill=(80, 80, 80))
        d.text((x + 4, height - down + 6), f"{comp} ({count} ops)", fill="black")
        start += count
    d.text((left + 300, 10), f"work per layer: {plan['checkpoint']['root']}", fill="black")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)


def _nice_step(span: float) -> float:
    raw = span / 6 or 1
    mag = 10 ** len(str(int(raw))) / 10
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag
