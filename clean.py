"""Data cleaning with IXC-2.5-Reward: score every sample of an instruction-tuning set, flag the lowest-scored ones
(hallucinated, empty or image-mismatched answers), and write a report a person can review.

    python clean.py --rm runs/rm --out runs/clean          # the built-in world's cleaning set, its noise labelled
    python clean.py --rm RM_DIR --data finetune.json --out runs/clean --flag-fraction 0.05
    python clean.py --data runs/world/sft_train.json --labels runs/world/sft_errors.json --flag-fraction auto \\
        --out runs/clean-sft                                # the world's 40000-row SFT set, its failures labelled
    torchrun --nproc_per_node 8 clean.py --rm RM_DIR --data finetune.json --out runs/clean [--resume]

Under torchrun each rank scores its share of the rows into OUT/scoring, and a killed run continues with --resume
(scoring.py; docs/scale.md).

Writes into --out (never over the input): kept.json and flagged.json (the input rows in the input's format, unchanged
but for relative image paths, rewritten to resolve from --out, so that `train.py --data OUT/kept.json` trains on
them), scores.jsonl, report.html (lowest scores first, with thumbnails, and a histogram) and summary.json. Rows
that carry a "noise" label (the world's cleaning set), or are named by `--labels` (a JSON list of {"id", "kind",
"family"}, as the world's sft_errors.json), are scored against it: AUROC overall, per family and per kind, precision
and recall of the rows flagged, and the report marks each flagged or noisy row a hit, a miss or a false alarm.

How many rows to flag, without labels: `--flag-fraction auto` cuts the score histogram at Otsu's threshold, the
cut that best separates it into two groups (largest between-group variance). Where noise is scored far below clean
rows, the histogram has two modes and the cut falls in the valley between them; `report.html` draws the histogram
and the cut, so a reader can check that it does.

A fine-tuning row is flagged by its answer's reward. A preference row (reward format) is flagged by its margin,
reward(chosen) - reward(rejected): a low or negative margin is a pair the reward model reads as mislabelled, while
a low reward on the rejected side is what a good pair looks like.
"""
import argparse
import base64
import html
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import common
import data
import scoring
from world import WORLD_DIR, store
from data import atomic_write_text
from model import add_device_args, device_kwargs
from reward import DEFAULT_RM, RewardModel, ensemble_scores, reward_dirs
from vision import sample_length


def load_samples(path, images_must_exist=True):
    """Fine-tuning rows (conversations + image), or reward rows whose chosen and rejected sides are scored apart."""
    rows = data.read_rows(path)
    if rows and isinstance(rows[0], dict) and "conversations_a" in rows[0]:
        pairs = data.read_preference(path, images_must_exist)
        return rows, [{"row": i, "side": side, "conversation": p[side], "images": p["images"], "id": p["id"]}
                      for i, p in enumerate(pairs) for side in ("chosen", "rejected")]
    return rows, [{"row": i, "side": None, **s} for i, s in enumerate(data.read_sft(path, images_must_exist))]


def rebase_images(row, src_dir, out_dir):
    """The row with its relative image paths rewritten to name the same files from out_dir."""
    if "image" not in row:
        return row
    fix = lambda p: p if os.path.isabs(p) else os.path.relpath(os.path.join(src_dir, p), out_dir)  # noqa: E731
    return dict(row, image=[fix(p) for p in row["image"]] if isinstance(row["image"], list) else fix(row["image"]))


def row_scores(samples, scores):
    """One score per input row: the answer's reward, or for a preference pair chosen minus rejected."""
    out = {}
    for s, sc in zip(samples, scores):
        out[s["row"]] = out.get(s["row"], 0.0) + (-sc if s["side"] == "rejected" else sc)
    return [out[r] for r in sorted(out)]


@torch.no_grad()
def score_samples(rms, samples, hd_num, normalize=False):
    """Reward of each sample of a batch (one right-padded forward per reward model)."""
    return ensemble_scores(rms, [s["conversation"] for s in samples], [s["images"] for s in samples], hd_num,
                           normalize)


def sample_tokens(rm, sample, hd_num):
    """A sample's tokens for the batcher; a missing image fails its row here (read with images_must_exist off)."""
    missing = [p for p in sample["images"] if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}")
    vc = rm.cfg.vision
    return sample_length(rm.tokenizer, sample, vc.image_size, vc.grid, hd_num)


def score_to_disk(rms, samples, out, a, rank, world):
    """Every sample's record ({"score"} or {"error"}) in input order on rank 0 (None on the others): this rank's
    share scored into OUT/scoring (scoring.py), then the ranks' files merged."""
    def name(i):
        return f"{a.data} row {samples[i]['row'] + 1} (id {samples[i]['id']!r})"
    scoring.score_rows(out, len(samples), lambda i: sample_tokens(rms[0], samples[i], a.hd_num),
                       lambda b: [{"score": x} for x in score_samples(rms, [samples[i] for i in b], a.hd_num,
                                                                      a.normalize)],
                       name, a.token_budget, a.on_error, rank, world, a.max_length)
    return scoring.merged(out, len(samples)) if rank == 0 else None


def auroc(pos, neg):
    """P(score of a flagged-worthy sample < score of a good one), ties half: the Mann-Whitney statistic."""
    if not pos or not neg:
        return float("nan")
    low = lambda x: -math.inf if math.isnan(x) else x  # noqa: E731  a broken (NaN) score ranks lowest, as it is flagged
    pos, neg_sorted = [low(x) for x in pos], sorted(low(x) for x in neg)
    import bisect
    total = 0.0
    for p in pos:
        lo, hi = bisect.bisect_left(neg_sorted, p), bisect.bisect_right(neg_sorted, p)
        total += (len(neg_sorted) - hi) + 0.5 * (hi - lo)
    return total / (len(pos) * len(neg))


def thumbnail(path, size=96):
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "PNG")
        return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    except (OSError, ValueError):
        return html.escape(Path(path).name)


def histogram_svg(scores, flag_at, bins=40, w=640, h=160):
    scores = [s for s in scores if math.isfinite(s)]
    if not scores:
        return "<p>no finite scores</p>"
    lo, hi = min(scores), max(scores)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for s in scores:
        counts[min(int((s - lo) / width), bins - 1)] += 1
    top = max(counts)
    bars = []
    for i, c in enumerate(counts):
        x0 = lo + i * width
        colour = "#d9534f" if x0 < flag_at else "#5b8def"
        bh = (h - 20) * c / top
        bars.append(f'<rect x="{i * w / bins:.1f}" y="{h - 20 - bh:.1f}" width="{w / bins - 1:.1f}" height="{bh:.1f}" '
                    f'fill="{colour}"><title>{x0:.3f}..{x0 + width:.3f}: {c}</title></rect>')
    return (f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{"".join(bars)}'
            f'<text x="0" y="{h - 4}" font-size="11">{lo:.3f}</text>'
            f'<text x="{w - 40}" y="{h - 4}" font-size="11">{hi:.3f}</text></svg>')


def write_report(path, samples, sample_scores, scores, flagged, rule, flag_at, title, show=200, noise=None):
    """`scores` and `flagged` are per row; a preference row shows both answers with their rewards. With `noise`
    (each row's known noise kind, "" when clean) a column says whether flagging it was a hit, a false alarm or a
    miss, and the misses are listed too."""
    by_row = {}
    for s, sc in zip(samples, sample_scores):
        by_row.setdefault(s["row"], []).append((s, sc))
    order = sorted(range(len(scores)), key=lambda r: lowest_first(scores[r]))
    rank_of = {r: i for i, r in enumerate(order)}
    misses = [r for r in order[show:] if noise and noise[r] and r not in flagged]   # noisy, scored too high to show
    hidden = len(misses) - show
    misses = misses[:show]
    rows = []
    for r in order[:show] + misses:
        rank = rank_of[r]
        s = by_row[r][0][0]
        conv = s["conversation"]
        # every turn before the scored answer: the questions, and earlier answers in italics
        question = "<br>".join(html.escape(m["content"]) if m["role"] == "user" else f"<i>{html.escape(m['content'])}</i>"
                               for m in conv[:-1] if m["role"] != "system")
        imgs = "".join(thumbnail(p) for p in s["images"][:4])
        answers = "<br>".join((f"<b>{x['side']} ({sc:+.3f}):</b> " if x["side"] else "")
                              + html.escape(x["conversation"][-1]["content"]) for x, sc in by_row[r])
        verdict = ""
        if noise is not None:
            verdict = ("hit: " if r in flagged else "miss: ") + noise[r] if noise[r] else \
                ("false alarm" if r in flagged else "")
            verdict = f'<td class="{verdict.split(":")[0].replace(" ", "-")}">{html.escape(verdict)}</td>'
        rows.append(f'<tr class="{"flag" if r in flagged else ""}"><td>{rank + 1}</td><td>{scores[r]:+.4f}</td>'
                    f'<td>{html.escape(str(s["id"]))}</td>{verdict}<td>{imgs}</td>'
                    f'<td>{question}</td><td>{answers}</td></tr>')
    known = "" if noise is None else (
        f" The rows' known noise is marked: <b>hit</b> (noisy and flagged, green), <b>false alarm</b> (clean and "
        f"flagged), <b>miss</b> (noisy, not flagged, orange); the {len(misses)} lowest-scored misses below the first "
        f"{show} rows follow them" + (f" ({hidden} more misses not shown: scores.jsonl has every row)." if hidden > 0
                                      else "."))
    doc = f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;
padding:4px 8px;vertical-align:top}} tr.flag td{{background:#fdecea}} img{{margin:2px}}
td.hit{{background:#c8e6c9!important}} td.miss{{background:#ffe0b2!important}} td.false-alarm{{background:#eee!important}}</style>
<h1>{html.escape(title)}</h1>
<p>{len(scores)} rows scored; {len(flagged)} flagged ({html.escape(rule)}, red). Lowest {min(show, len(scores))}
shown first ({max(len(scores) - show, 0)} rows above them not shown): check whether the answer matches the image and the question.{known}</p>
{histogram_svg(scores, flag_at)}
<table><tr><th>#</th><th>score</th><th>id</th>{"<th>known noise</th>" if noise is not None else ""}<th>image</th>
<th>question</th><th>answer</th></tr>{"".join(rows)}</table>
"""
    atomic_write_text(path, doc)


def broken(score):
    """NaN or -inf (fp16 overflow, a broken sample): always flagged, shown first. +inf is just a very high score."""
    return math.isnan(score) or score == float("-inf")


def lowest_first(score):
    return (0, 0.0) if broken(score) else (1, score)


def otsu_threshold(scores, bins=256):
    """The cut between two groups of scores that maximises w_low * w_high * (mean_low - mean_high)^2 over the
    histogram's bin edges (Otsu 1979): rows below it are flagged."""
    x = sorted(v for v in scores if math.isfinite(v))
    if len(x) < 2 or x[0] == x[-1]:
        return -math.inf
    lo, width = x[0], (x[-1] - x[0]) / bins
    counts, sums = [0] * bins, [0.0] * bins
    for v in x:
        b = min(int((v - lo) / width), bins - 1)
        counts[b] += 1
        sums[b] += v
    n, total = len(x), sum(x)
    best, cut, n_low, s_low = -1.0, -math.inf, 0, 0.0
    for b in range(bins - 1):
        n_low, s_low = n_low + counts[b], s_low + sums[b]
        if 0 < n_low < n:
            between = n_low * (n - n_low) * (s_low / n_low - (total - s_low) / (n - n_low)) ** 2
            if between > best:
                best, cut = between, lo + (b + 1) * width
    return cut


def flag_rows(scores, flag_fraction, threshold=None):
    """Rows to flag, the rule in words, and the threshold that `--threshold` would need to flag the same rows
    (`score < threshold`). A fraction flags the k lowest rows and every row tied with the k-th, so that identical
    answers share one fate."""
    bad = {r for r, x in enumerate(scores) if broken(x)}
    if flag_fraction == "auto" and threshold is None:
        cut = otsu_threshold(scores)
        return bad | {r for r, x in enumerate(scores) if x < cut}, f"score < {cut:.4f} (Otsu's threshold)", cut
    if threshold is not None:
        return bad | {r for r, x in enumerate(scores) if x < threshold}, f"score < {threshold:.4f}", threshold
    k = int(flag_fraction * len(scores))
    ok = sorted(x for x in scores if not broken(x))
    if k <= len(bad) or not ok:
        return bad, "broken scores only", float("-inf")
    cut = ok[min(k - len(bad), len(ok)) - 1]
    above = [x for x in ok if x > cut]
    return bad | {r for r, x in enumerate(scores) if x <= cut}, f"score <= {cut:.4f}", above[0] if above else math.inf


def fraction_or_auto(text):
    return text if text == "auto" else data.fraction(text)


def row_labels(rows, labels_path):
    """Each row's known noise kind ("" when clean) and family, or (None, None) when nothing labels the rows. The
    world's cleaning set carries a "noise" field on every row; `labels_path` names noisy rows by id."""
    if labels_path:
        rows_of = {}
        for i, r in enumerate(data.read_rows(labels_path)):
            if not isinstance(r, dict) or "id" not in r or "kind" not in r:
                raise ValueError(f"{labels_path}: row {i + 1}: expected an object with 'id' and 'kind'")
            rows_of[str(r["id"])] = r
        ids = [str(row.get("id")) for row in rows]
        if not set(rows_of) & set(ids):
            raise ValueError(f"{labels_path}: names none of the {len(rows)} rows' ids")
        return ([rows_of[i]["kind"] if i in rows_of else "" for i in ids],
                [rows_of[i].get("family", rows_of[i]["kind"]) if i in rows_of else "" for i in ids])
    if all(isinstance(r, dict) and "noise" in r for r in rows):
        noise = [r["noise"] or "" for r in rows]
        return noise, noise
    return None, None


def label_metrics(scores, flagged, noise, family):
    """How well the scores find the labelled rows: AUROC (a noisy row below a clean one) overall, by family and by
    kind, and precision and recall of the flagged rows, overall and per family and kind."""
    bad = [r for r, n in enumerate(noise) if n]
    good = [scores[r] for r, n in enumerate(noise) if not n]
    out = {"noisy_in_data": len(bad), "auroc": auroc([scores[r] for r in bad], good)}
    hit = sum(r in flagged for r in bad)
    out["precision_at_flagged"] = hit / max(len(flagged), 1)
    out["recall_at_flagged"] = hit / max(len(bad), 1)
    for name, label in (("family", family), ("kind", noise)):
        groups = sorted(set(label) - {""})
        out[f"rows_by_{name}"] = {g: sum(x == g for x in label) for g in groups}
        out[f"auroc_by_{name}"] = {g: auroc([scores[r] for r in bad if label[r] == g], good) for g in groups}
        out[f"recall_at_flagged_by_{name}"] = {g: sum(r in flagged for r in bad if label[r] == g) /
                                               out[f"rows_by_{name}"][g] for g in groups}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--rm", nargs="+", help=f"reward model dir(s); several are averaged (default: {DEFAULT_RM})")
    p.add_argument("--data", help="fine-tuning (or reward) JSON/JSONL (default: the built-in world's cleaning set)")
    p.add_argument("--labels", help="JSON list of {id, kind[, family]}: the rows known to be noisy (the world's "
                   "sft_errors.json); AUROC, precision and recall are reported against them (default: none; the "
                   "rows' own \"noise\" field when they have one)")
    p.add_argument("--out", default="runs/clean", help="output directory, never over an existing output")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--flag-fraction", type=fraction_or_auto, default=0.15,
                   help="flag this lowest-scored fraction of the rows (rows tied with the last one flagged too); "
                        "auto: below Otsu's threshold on the score histogram")
    g.add_argument("--threshold", type=float, help="flag every row scored below this (the reward; a preference "
                   "row: its margin) instead of a fraction (default: none, --flag-fraction decides)")
    p.add_argument("--hd-num", type=data.positive_int, default=9, help="max HD crops per image (the official "
                   "recipe's 9)")
    p.add_argument("--normalize", action="store_true", help="standardise each RM's scores by the held-out mean and "
                   "std its rm stage stored, before averaging")
    p.add_argument("--world-dir", default=str(WORLD_DIR), help="the built-in world's files, made on first use "
                   "(default: runs/world in the repository)")
    scoring.add_scoring_args(p, budget=8192)
    add_device_args(p)
    a = p.parse_args(argv)
    rank, world = scoring.setup(a)
    t0 = time.time()
    a.rm = reward_dirs(a.rm)
    if a.data is None:
        a.data = str(store.ensure_world(a.world_dir)["clean_set"])
    src, out = Path(a.data).resolve(), Path(a.out).resolve()
    inputs = [src] + ([a.labels] if a.labels else [])
    outputs = [out / n for n in ("kept.json", "flagged.json", "scores.jsonl", "report.html", "summary.json")]
    data.refuse_existing([] if a.resume else outputs, inputs=inputs)
    rows, samples = load_samples(src, images_must_exist=a.on_error == "fail")
    if not rows:
        raise ValueError(f"{src}: no rows to score")
    noise, family = row_labels(rows, a.labels)
    run = {"data": scoring.fingerprint(src), "labels": a.labels and scoring.fingerprint(a.labels),
           "rm": [scoring.fingerprint(d) for d in a.rm], "hd_num": a.hd_num, "normalize": a.normalize,
           "max_length": a.max_length, "dtype": str(device_kwargs(a)["dtype"]),
           "flag_fraction": a.flag_fraction, "threshold": a.threshold}
    if scoring.start(out, run, a.resume, "summary.json", rank, world):
        common.teardown_distributed(world)
        return json.loads((out / "summary.json").read_text())
    rms = [RewardModel.from_pretrained(d, **device_kwargs(a)) for d in a.rm]
    records = score_to_disk(rms, samples, out, a, rank, world)
    if rank == 0:
        summary = write_outputs(a, src, out, rows, samples, records, noise, family)
        summary.update(seconds=round(time.time() - t0, 1), processes=world, matmul_gflops=common.matmul_gflops())
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))   # last: it marks the run finished
        print(json.dumps(summary, indent=2))
    common.teardown_distributed(world)
    return summary if rank == 0 else None


def write_outputs(a, src, out, rows, samples, records, noise, family):
    """kept.json, flagged.json, scores.jsonl and report.html from every sample's record; the summary's figures.
    A row whose sample failed (--on-error skip) is in neither kept.json nor flagged.json: the summary names it."""
    failed = {}
    for s, rec in zip(samples, records):
        if "error" in rec:
            failed.setdefault(s["row"], {"id": s["id"], "reason": rec["error"]})
    atomic_write_text(out / "scores.jsonl", "".join(json.dumps({"id": s["id"], "side": s["side"],
                                                                "score": scoring.finite(rec.get("score")),
                                                                **({"error": rec["error"]} if "error" in rec else {})})
                                                    + "\n" for s, rec in zip(samples, records)))
    live = [r for r in range(len(rows)) if r not in failed]
    at = {r: k for k, r in enumerate(live)}
    rows = [rebase_images(rows[r], src.parent, out) for r in live]
    scored = [(dict(s, row=at[s["row"]]), rec["score"]) for s, rec in zip(samples, records) if s["row"] in at]
    samples, sample_scores = [s for s, _ in scored], [x for _, x in scored]
    noise, family = (None, None) if noise is None else ([noise[r] for r in live], [family[r] for r in live])
    scores = row_scores(samples, sample_scores)
    flagged, rule, flag_at = flag_rows(scores, a.flag_fraction, a.threshold)
    if a.threshold is None and a.flag_fraction != "auto" and len(flagged) > 1.5 * a.flag_fraction * len(scores) + 1:
        print(f"note: {len(flagged)} rows flagged for the {a.flag_fraction:.0%} asked: rows tied at the cut "
              f"({rule}) are flagged together", file=sys.stderr)
    atomic_write_text(out / "flagged.json", json.dumps([rows[r] for r in sorted(flagged)], indent=1,
                                                       ensure_ascii=False))
    atomic_write_text(out / "kept.json", json.dumps([row for r, row in enumerate(rows) if r not in flagged],
                                                    indent=1, ensure_ascii=False))
    write_report(out / "report.html", samples, sample_scores, scores, flagged, rule, flag_at,
                 f"Reward scores of {src.name}", noise=noise)
    summary = {"data": str(src), "rows": len(rows), "samples": len(samples), "flagged": len(flagged), "rule": rule,
               "threshold": flag_at if math.isfinite(flag_at) else None,
               "broken_scores": sum(map(broken, scores)),
               "skipped": [failed[r] for r in sorted(failed)],
               "score": "margin" if samples and samples[0]["side"] else "reward", "rm": a.rm}
    if noise is not None:
        summary.update(label_metrics(scores, flagged, noise, family), labels=a.labels or "the rows' noise field")
    return summary

if __name__ == "__main__":
    data.run_cli(main)
