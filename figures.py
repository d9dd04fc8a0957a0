"""Figures drawn as plain SVG (no plotting dependency): the learning curves every run writes beside its
metrics.jsonl, and the over-optimisation figure of PPO runs, drawn as Gao et al. (2022) draw it.

    python figures.py overoptimisation runs/ppo runs/ppo-kl0 --out overoptimisation.svg   # one line per run
"""
import argparse
import html
import json
import math
from pathlib import Path

import data

def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


SMOOTH = 4                   # a smoothed curve averages 2 * SMOOTH + 1 logged points
HELDOUT = {"accuracy": "heldout_accuracy"}   # a training value's panel -> the held-out value drawn over it
COLOURS = ("#2a6fdb", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c", "#1098ad", "#e67700", "#495057")
# what each logged key is, with its unit, for the axis that shows it
LABELS = {"step": "optimizer step", "loss": "loss (nats)", "accuracy": "accuracy (fraction)",
          "grad_norm": "gradient norm", "lr": "learning rate", "heldout_accuracy": "held-out accuracy (fraction)",
          "score": "reward-model score (normalised)", "kl": "KL to the reference (nats per response)",
          "train_accuracy": "checker: samples right (fraction)", "value_loss": "value loss (reward units squared)",
          "entropy": "entropy (nats per token)", "response_length": "response length (tokens)"}


def ticks(lo, hi, most=8, whole=False):
    """Evenly spaced round values (1, 2, 2.5 or 5 times a power of ten; whole numbers if `whole`) from lo or below
    to hi or above, at most `most` steps end to end, the finest such: the axis runs from the first to the last."""
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):  # a flat line: an axis 10% of its value either side of it
        lo, hi = lo - (0.1 * abs(lo) or 0.5), hi + (0.1 * abs(hi) or 0.5)
    mag = 10 ** math.floor(math.log10(hi - lo))
    for step in [m * e for e in (mag / 10, mag) for m in (1, 2, 2.5, 5)] + [10 * mag]:
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        if last - first <= most and (step == int(step) or not whole):
            return [round(i * step, 12) for i in range(first, last + 1)]


def scale(axis, a, b):
    """The map from values to pixels that puts the axis' first tick at a and its last at b."""
    return lambda v: a + (b - a) * (v - axis[0]) / (axis[-1] - axis[0])


def svg_text(x, y, text, size=11, anchor="start", rotate=False):
    turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{turn}>'
            f'{html.escape(str(text))}</text>')


def svg_axes(box, xt, yt, xlabel, ylabel, right=None):
    """A frame `box` (x, y, width, height) with grid lines at the ticks `xt` and `yt`, their values, and each axis
    labelled; `right` = (ticks, label) adds a second y axis on the right for a second kind of line."""
    x0, y0, w, h = box
    px, py = scale(xt, x0, x0 + w), scale(yt, y0 + h, y0)
    out = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>']
    for t in xt:
        out += [f'<line x1="{px(t):.1f}" y1="{y0}" x2="{px(t):.1f}" y2="{y0 + h + 4}" stroke="#e4e4e4"/>',
                svg_text(px(t), y0 + h + 15, f"{t:g}", 10, "middle")]
    for t in yt:
        out += [f'<line x1="{x0 - 4}" y1="{py(t):.1f}" x2="{x0 + w}" y2="{py(t):.1f}" stroke="#e4e4e4"/>',
                svg_text(x0 - 6, py(t) + 3.5, f"{t:g}", 10, "end")]
    out += [svg_text(x0 + w / 2, y0 + h + 31, xlabel, 11, "middle"),
            svg_text(x0 - 44, y0 + h / 2, ylabel, 11, "middle", rotate=True)]
    if right:
        rt, label = right
        pr = scale(rt, y0 + h, y0)
        out += [svg_text(x0 + w + 6, pr(t) + 3.5, f"{t:g}", 10) for t in rt]
        out += [f'<line x1="{x0 + w}" y1="{pr(t):.1f}" x2="{x0 + w + 4}" y2="{pr(t):.1f}" stroke="#888"/>' for t in rt]
        out.append(svg_text(x0 + w + 50, y0 + h / 2, label, 11, "middle", rotate=True))
    return "".join(out)


def svg_line(points, px, py, colour, dashed=False):
    """A polyline through `points` in the order given, with a dot on each point while there are few."""
    xy = [(px(x), py(y)) for x, y in points]
    dots = "" if len(xy) > 30 else "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>'
                                           for x, y in xy)
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    return (f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in xy)}" fill="none" stroke="{colour}" '
            f'stroke-width="1.5"{dash}/>{dots}')


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def smoothed(ys, half=SMOOTH):
    """The centred moving average over 2 * half + 1 logged points (fewer at the ends): the trend of a noisy
    per-batch value, without the lag of an exponential average."""
    return [sum(ys[max(0, i - half):i + half + 1]) / len(ys[max(0, i - half):i + half + 1]) for i in range(len(ys))]


def svg_dots(points, px, py, colour, r=2.0, opacity=1.0):
    return "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{r}" fill="{colour}" fill-opacity="{opacity}"/>'
                   for x, y in points)


def curves_svg(metrics_path, keys, title, x="step", xlabel=None, heldout=None, w=330, h=220):
    """Learning curves from metrics.jsonl as one SVG: a panel per key (titled with the key as logged), its value
    against `x` in the log's order, each panel on its own axes. Many points (a per-batch value): the raw points
    faint and their smoothed() trend over them. `heldout` maps a panel's key to the key of its held-out value,
    drawn as large dots from the held-out lines of the log and, at its last step, from summary.json beside it.
    Lines with a "phase" restate numbers logged on another line (PPO's held-out checks, with their iteration's KL
    and score) and are left out."""
    rows = [r for r in read_metrics(metrics_path) if "phase" not in r]
    summary_path = Path(metrics_path).parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if finite(summary.get("steps")):
        rows.append({x: summary["steps"], **{k: v for k, v in summary.items() if k in (heldout or {}).values()}})
    held = {key: [(r[x], r[hk]) for r in rows if finite(r.get(x)) and finite(r.get(hk))]
            for key, hk in (heldout or {}).items()}
    panels = [(key, pts) for key in keys
              if (pts := [(r[x], r[key]) for r in rows if finite(r.get(x)) and finite(r.get(key))])]
    cols = min(3, max(1, len(panels)))
    out = [f'<svg width="{w * cols}" height="{30 + h * math.ceil(len(panels) / cols)}" '
           f'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">', svg_text(8, 18, title, 14)]
    for i, (key, pts) in enumerate(panels):
        box = (w * (i % cols) + 64, 30 + h * (i // cols) + 22, w - 78, h - 66)
        xs, ys = zip(*pts + held.get(key, []))
        xt, yt = ticks(min(xs), max(xs), whole=all(isinstance(v, int) for v in xs)), ticks(min(ys), max(ys))
        px, py = scale(xt, box[0], box[0] + box[2]), scale(yt, box[1] + box[3], box[1])
        out += [svg_text(box[0], box[1] - 6, key, 12), svg_axes(box, xt, yt, xlabel or LABELS.get(x, x),
                                                                LABELS.get(key, key))]
        if len(pts) > 2 * SMOOTH + 1:
            trend = list(zip([p[0] for p in pts], smoothed([p[1] for p in pts])))
            out += [svg_dots(pts, px, py, COLOURS[0], 1.5, 0.35), svg_line(trend, px, py, COLOURS[0])]
            legend = [(f"mean of {2 * SMOOTH + 1} logged", COLOURS[0])]
        else:
            out.append(svg_line(pts, px, py, COLOURS[0]))
            legend = []
        if held.get(key):
            out.append(svg_dots(held[key], px, py, COLOURS[1], 4.0))
            legend.append(("held-out", COLOURS[1]))
        for j, (label, colour) in enumerate(legend):
            out.append(svg_text(box[0] + box[2], box[1] - 6 - 12 * (len(legend) - 1 - j), label, 10, "end")
                       .replace("<text ", f'<text fill="{colour}" '))
    return "".join(out) + "</svg>"


def write_curves(out, keys, title, xlabel=None, heldout=HELDOUT):
    """curves.svg of metrics.jsonl beside it, rewritten whole (atomically) whenever it is called."""
    if (out / "metrics.jsonl").is_file():
        data.atomic_write_text(out / "curves.svg", curves_svg(out / "metrics.jsonl", keys, title, xlabel=xlabel,
                                                              heldout=heldout))


# ----------------------------------------------------------------------------------------------------------------
# Over-optimisation, drawn as Gao et al. 2022 draw it (their Fig. 1): gold and proxy scores against sqrt(KL)


def overoptimisation_svg(runs, gold="heldout_right", w=780, h=420):
    """From each run's held-out checks (metrics.jsonl): the checker's score (gold: by default the fraction of greedy
    held-out answers with no failure; solid, left axis) and the reward model's (proxy: the mean score of that
    iteration's samples; dashed, right axis) against sqrt(KL to the reference), a colour per run, joined in order
    of KL."""
    lines = []
    for i, run in enumerate(map(Path, runs)):
        rows = [r for r in read_metrics(run / "metrics.jsonl") if finite(r.get(gold))]
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        label = f"--kl-coef {summary['kl_coef']} ({run.name})" if "kl_coef" in summary else run.name
        lines.append((label, COLOURS[i % len(COLOURS)],
                      sorted((math.sqrt(max(r["kl"], 0.0)), r[gold], r["score"]) for r in rows)))
    points = [p for *_, pts in lines for p in pts]
    if not points:
        raise ValueError(f"no held-out checks ('{gold}') in the metrics.jsonl of {', '.join(map(str, runs))}")
    xs, golds, proxies = zip(*points)
    xt, gt, pt = ticks(0.0, max(xs)), ticks(min(golds), max(golds)), ticks(min(proxies),
                                                                                             max(proxies))
    box = (70, 40, w - 330, h - 100)
    px, (py_gold, py_proxy) = scale(xt, box[0], box[0] + box[2]), (scale(t, box[1] + box[3], box[1])
                                                                          for t in (gt, pt))
    what = "held-out answers right (fraction)" if gold == "heldout_right" else gold
    out = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">',
           svg_text(8, 20, "Over-optimisation (Gao et al. 2022): the checker (gold) and the reward model "
                           "(proxy) against KL", 14),
           svg_axes(box, xt, gt, "√KL to the reference (√nats; KL per response)", f"gold: checker, {what}",
                           right=(pt, "proxy: reward-model score (normalised)"))]
    key = [("gold (checker)", "#444", ""), ("proxy (reward model)", "#444", ' stroke-dasharray="6 4"')]
    for i, (label, colour, dash) in enumerate(key + [(label, colour, "") for label, colour, _ in lines]):
        x, y = box[0] + box[2] + 80, box[1] + 8 + 18 * i + 12 * (i >= 2)
        out += [f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="{colour}" stroke-width="2"{dash}/>',
                svg_text(x + 30, y, label, 11)]
    for _, colour, pts in lines:
        out += [svg_line([(x, g) for x, g, _ in pts], px, py_gold, colour),
                svg_line([(x, p) for x, _, p in pts], px, py_proxy, colour, dashed=True)]
    return "".join(out) + "</svg>"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=["overoptimisation"])
    p.add_argument("runs", nargs="+", help="PPO run directories (their metrics.jsonl and summary.json)")
    p.add_argument("--out", required=True, help="the SVG to write")
    p.add_argument("--gold", default="heldout_right", help="the checker's metric (a key of the held-out checks)")
    a = p.parse_args(argv)
    data.atomic_write_text(Path(a.out), overoptimisation_svg(a.runs, a.gold))


if __name__ == "__main__":
    data.run_cli(main)
