"""Benchmark accuracy of IXC-2.5-Reward: VL-RewardBench, RM-Bench and RewardBench, each metric as its benchmark
defines it, from a reward model's scores or from a file of precomputed ones.

    python evaluate.py --bench vl_rewardbench --data FILE (--ckpt DIR [--images DIR] | --scores FILE) [--out M.json]
"""
import argparse
import json
import math
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

import common
import data
import scoring
from data import atomic_write_text
from model import add_device_args, device_kwargs
from reward import RewardModel, ensemble_scores
from vision import sample_length

# ----------------------------------------------------------------------------------------------------------------
# Metrics, as each benchmark's official script defines them (named below); fractions in [0, 1], ties are wrong

# VL-RewardBench (IXC evaluation/vl_rewardbench/inference.py)

# Substring tests in the official script's order; the first hit wins.
_VLRB_CATEGORIES = [("reasoning", ("reasoning_tasks",)), ("general", ("vlfeedback", "wildvision-battle")),
                    ("hallucination", ("povid", "rlhf-v", "rlaif-v"))]


def vl_rewardbench_category(image_path):
    for category, folders in _VLRB_CATEGORIES:
        if any(f in image_path for f in folders):
            return category
    raise ValueError(f"VL-RewardBench: no category for image_path {image_path!r}")


def _mean(xs):
    return sum(xs) / len(xs) if xs else math.nan  # empty group: NaN, not upstream's silent 0


def vl_rewardbench_metrics(rows, correct):
    if len(rows) != len(correct):
        raise ValueError(f"{len(rows)} rows but {len(correct)} correctness flags")
    groups = {"general": [], "hallucination": [], "reasoning": []}
    for row, ok in zip(rows, correct):
        groups[vl_rewardbench_category(row["image_path"])].append(int(ok))
    out = {"overall": _mean([int(c) for c in correct]), "n": len(rows)}
    for name, xs in groups.items():
        out[name], out[f"n_{name}"] = _mean(xs), len(xs)
    # Macro is the unweighted mean of the three categories (Hallucination is ~60% of rows).
    out["macro"] = (out["general"] + out["hallucination"] + out["reasoning"]) / 3
    return out


def vl_rewardbench_correct_from_scores(rows, scores):
    # human_ranking[k] is the rank of response[k], 0 = best: [0, 1] prefers response 0 and
    # [1, 0] response 1 (e.g. the rows where response 1 is the refusal of a jailbreak prompt).
    # The official check `model.rank(shown) == human_ranking (reversed if swapped)` reduces to
    # "preferred response scores higher", whatever the display order. Ties count as wrong here;
    # officially they depend on how the model's remote-code rank() orders equal scores (not checked).
    out = []
    for row, (s0, s1) in zip(rows, scores, strict=True):
        ranking = list(row["human_ranking"])
        if ranking not in ([0, 1], [1, 0]):
            raise ValueError(f"row {row.get('id')!r}: human_ranking {ranking} is not [0, 1] or [1, 0]")
        best, other = (s0, s1) if ranking == [0, 1] else (s1, s0)
        out.append(int(best > other))
    return out


def vl_rewardbench_order(n, seed=0):
    # Per-row swap flags, drawn as the official script does: Python's `random` seeded once
    # (transformers.set_seed), then random.choice([0, 1]) per row; 1 = show response[1] first.
    # The script says seed 0, but the published results.json `random_numbers` equal seed 1234.
    rng = random.Random(seed)
    return [rng.choice([0, 1]) for _ in range(n)]


# RM-Bench (THU-KEG/RM-Bench scripts; IXC evaluation/rm_bench/inference.py)
# Styles in order: concise, detailed-plain, detailed-markdown.

def rm_bench_matrix(score_chosen, score_rejected):
    c, r = np.asarray(score_chosen, float), np.asarray(score_rejected, float)
    if c.ndim != 2 or c.shape[1] != 3 or c.shape != r.shape:
        raise ValueError(f"expected two (k, 3) score arrays, got {c.shape} and {r.shape}")
    # M[i, j] = fraction of prompts whose chosen style i beats rejected style j (ties lose).
    return (c[:, :, None] > r[:, None, :]).mean(axis=0)


def _rm_bench_summary(c, r):
    m = rm_bench_matrix(c, r)
    hard = m[np.triu_indices(3, 1)].mean()  # plainer chosen vs fancier rejected
    normal, easy = np.diag(m).mean(), m[np.tril_indices(3, -1)].mean()
    # IXC's 68.8 headline is this average, not the mean of the per-domain averages.
    return {"hard": float(hard), "normal": float(normal), "easy": float(easy),
            "average": float(hard + normal + easy) / 3, "n": len(c)}


def rm_bench_metrics(score_chosen, score_rejected, domains=None):
    out = _rm_bench_summary(score_chosen, score_rejected)
    if domains is not None:
        c, r, d = np.asarray(score_chosen, float), np.asarray(score_rejected, float), np.asarray(domains)
        if len(d) != len(c):
            raise ValueError(f"{len(c)} prompts but {len(d)} domains")
        out["domains"] = {str(k): _rm_bench_summary(c[d == k], r[d == k]) for k in sorted(set(d.tolist()))}
    return out


# RewardBench (allenai/reward-bench rewardbench/constants.py, utils.py)

# SUBSET_MAPPING with each subset's EXAMPLE_COUNTS weight (the weights, not the observed counts, are
# used). math-prm has 447 rows but weighs 984 = 6 x 164, the HumanEvalPack total. xstest refuse 250 /
# respond 154 as in upstream constants.py (some third-party copies swap the pair, which shifts Safety).
_RB_SECTIONS = {
    "chat": {"alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
             "mt-bench-med": 40},
    "chat_hard": {"mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
                  "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46},
    "safety": {"refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 250,
               "xstest-should-respond": 154, "donotanswer": 136},
    "reasoning": {"math-prm": 984, **{f"hep-{lang}": 164 for lang in ("cpp", "go", "java", "js", "python", "rust")}},
}


def rewardbench_metrics(subsets, correct):
    if len(subsets) != len(correct):
        raise ValueError(f"{len(subsets)} subset names but {len(correct)} correctness flags")
    flags = defaultdict(list)
    for s, ok in zip(subsets, correct):
        flags[s].append(int(ok))
    acc = {s: _mean(xs) for s, xs in flags.items()}
    out = {"subsets": acc}
    for section, weights in _RB_SECTIONS.items():
        present = [s for s in weights if s in acc]  # upstream skips absent subsets
        w = sum(weights[s] for s in present)
        # Upstream reports 0 for a section with no subsets; NaN makes the gap visible instead.
        out[section] = sum(acc[s] * weights[s] for s in present) / w if w else math.nan
    out["score"] = sum(out[s] for s in _RB_SECTIONS) / len(_RB_SECTIONS)
    return out


# Precomputed score files: one JSON object per line

_SCORE_FIELDS = {  # bench -> {field: list length, or None for a single number}
    "vl_rewardbench": {"scores": 2},
    "rm_bench": {"scores_chosen": 3, "scores_rejected": 3},
    "rewardbench": {"score_chosen": None, "score_rejected": None},
}


def _is_score(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _valid(rec, fields):
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), (str, int)) or isinstance(rec["id"], bool):
        return False
    return all(_is_score(rec.get(k)) if n is None else
               isinstance(rec.get(k), list) and len(rec[k]) == n and all(map(_is_score, rec[k]))
               for k, n in fields.items())


def read_scores_jsonl(path, bench):
    if bench not in _SCORE_FIELDS:
        raise ValueError(f"unknown bench {bench!r}; expected one of {sorted(_SCORE_FIELDS)}")
    fields = _SCORE_FIELDS[bench]
    want = ", ".join(['"id"'] + [f'"{k}": {f"[{n} numbers]" if n else "number"}' for k, n in fields.items()])
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec, err = json.loads(line), None
            except json.JSONDecodeError as e:
                rec, err = None, f"invalid JSON ({e.msg})"
            if not _valid(rec, fields):
                raise ValueError(f"{path}:{lineno}: expected {{{want}}} with finite numbers, "
                                 f"got {err or line.strip()[:200]}")
            out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line


_ROW_FIELDS = {  # bench -> fields every data row needs (for metrics from scores, for scoring with a model)
    "vl_rewardbench": ({"id": None, "image_path": str, "human_ranking": 2}, {"query": str, "response": 2}),
    "rm_bench": ({"id": None}, {"prompt": str, "chosen": 3, "rejected": 3}),
    "rewardbench": ({"id": None, "subset": str}, {"prompt": str, "chosen": str, "rejected": str}),
}


def check_bench_rows(path, bench, rows, scoring):
    """Name the file, row and field of a benchmark row that lacks what the metrics (or the scoring) read."""
    if not rows:
        raise ValueError(f"{path}: no benchmark rows")
    need, text = _ROW_FIELDS[bench]
    need = {**need, **text} if scoring else need
    for i, row in enumerate(rows):
        for key, kind in need.items():
            v = row.get(key) if isinstance(row, dict) else None
            ok = v is not None if kind is None else isinstance(v, str) if kind is str else \
                isinstance(v, list) and len(v) == kind
            if not ok:
                want = "a value" if kind is None else "a string" if kind is str else f"a list of {kind}"
                raise ValueError(f"{path} row {i + 1}: field {key!r} must be {want}, got {v!r}")


def finite_or_null(x):
    """Metrics JSON without bare NaN (invalid JSON): an empty group's NaN becomes null."""
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def bench_conversations(bench, row, swap, images_dir=None):
    """A row's conversations and images as scored, and how its scores (in that order) make its record."""
    if bench == "vl_rewardbench":
        image = [str(Path(images_dir or ".") / row["image_path"])]
        order = [1, 0] if swap else [0, 1]  # shown in a seeded random order, as the official script
        return ([data.qa(row["query"], row["response"][k]) for k in order], [image, image],
                lambda s: {"scores": [s[order.index(0)], s[order.index(1)]]})
    if bench == "rm_bench":
        return ([data.qa(row["prompt"], r) for r in row["chosen"] + row["rejected"]], [[]] * 6,
                lambda s: {"scores_chosen": s[:3], "scores_rejected": s[3:]})
    return ([data.qa(row["prompt"], row["chosen"]), data.qa(row["prompt"], row["rejected"])], [[], []],
            lambda s: {"score_chosen": s[0], "score_rejected": s[1]})


def score_benchmark(rms, bench, rows, images_dir=None, hd_num=9, seed=1234, indices=None):
    """Records in the --scores file format for rows `indices` (default: all), their conversations scored in one
    batch by the (averaged) reward model(s)."""
    indices = range(len(rows)) if indices is None else indices
    swaps = vl_rewardbench_order(len(rows), seed)
    parts = [bench_conversations(bench, rows[i], swaps[i], images_dir) for i in indices]
    flat = ensemble_scores(rms, [c for convs, _, _ in parts for c in convs],
                           [im for convs, ims, _ in parts for im in ims], hd_num)
    out, k = [], 0
    for i, (convs, _, record) in zip(indices, parts):
        out.append({"id": rows[i]["id"], **record(flat[k:k + len(convs)])})
        k += len(convs)
    return out


def row_tokens(rm, bench, row, images_dir, hd_num):
    """A row's tokens for the batcher: all its conversations, as scored."""
    convs, images, _ = bench_conversations(bench, row, 0, images_dir)
    vc = rm.cfg.vision
    for im in images[0]:
        if not Path(im).exists():
            raise FileNotFoundError(f"image not found: {im}")
    return sum(sample_length(rm.tokenizer, {"conversation": c, "images": ims}, vc.image_size, vc.grid, hd_num)
               for c, ims in zip(convs, images))


def benchmark_metrics(bench, rows, recs):
    """Score records align with data rows by position (VL-RewardBench repeats some ids); ids must agree."""
    if len(recs) != len(rows):
        raise ValueError(f"{len(recs)} score records for {len(rows)} data rows; expected one per row, in order")
    for i, (row, rec) in enumerate(zip(rows, recs)):
        if str(row["id"]) != str(rec["id"]):
            raise ValueError(f"score record {i + 1} has id {rec['id']!r} but data row {i + 1} has id {row['id']!r}")
    if bench == "vl_rewardbench":
        return vl_rewardbench_metrics(rows, vl_rewardbench_correct_from_scores(rows, [r["scores"] for r in recs]))
    if bench == "rm_bench":
        return rm_bench_metrics([r["scores_chosen"] for r in recs], [r["scores_rejected"] for r in recs],
                                [r.get("domain", r.get("subset", "all")).split("-")[0] for r in rows])
    correct = [int(r["score_chosen"] > r["score_rejected"]) for r in recs]
    return rewardbench_metrics([r["subset"] for r in rows], correct)


def main(argv=None):
    p = argparse.ArgumentParser(description="benchmark accuracy of a reward model")
    p.add_argument("--bench", required=True, choices=["vl_rewardbench", "rewardbench", "rm_bench"])
    p.add_argument("--data", required=True, help="benchmark rows (JSON list or JSONL)")
    p.add_argument("--images", help="folder the rows' image_path is relative to (VL-RewardBench)")
    p.add_argument("--ckpt", nargs="+", help="reward model dir(s); several are averaged (an ensemble)")
    p.add_argument("--scores", help="precomputed scores, one JSON object per line")
    p.add_argument("--hd-num", type=data.positive_int, default=9, help="9 in the official evaluation scripts")
    p.add_argument("--out", help="also write the metrics JSON here (a new file)")
    p.add_argument("--scores-dir", help="with --ckpt: a directory for the scores as they are made (scoring/, one "
                   "file per rank) and, at the end, scores.jsonl in the --scores format and metrics.json; needed "
                   "under torchrun and for --resume (default: a temporary directory, removed)")
    scoring.add_scoring_args(p, budget=16384)
    add_device_args(p)
    a = p.parse_args(argv)
    if bool(a.ckpt) == bool(a.scores):
        p.error("give exactly one of --ckpt or --scores")
    if a.scores and a.scores_dir:
        p.error("--scores-dir holds the scores --ckpt makes; --scores reads a file of them")
    rank, world = scoring.setup(a)
    if a.scores or not a.scores_dir:
        if world > 1 or a.resume:
            p.error("torchrun and --resume score with --ckpt into --scores-dir")
        if a.out:
            data.refuse_existing([a.out], inputs=[a.data] + ([a.scores] if a.scores else []))
        rows = data.read_rows(a.data)
        check_bench_rows(a.data, a.bench, rows, scoring=bool(a.ckpt))
        if a.scores:
            return report(benchmark_metrics(a.bench, rows, read_scores_jsonl(a.scores, a.bench)), a.out)
        with tempfile.TemporaryDirectory() as tmp:
            return report(score_to_disk(a, rows, tmp, 0, 1), a.out)
    if a.out and not a.resume:
        data.refuse_existing([a.out], inputs=[a.data])
    rows = data.read_rows(a.data)
    check_bench_rows(a.data, a.bench, rows, scoring=True)
    run = {"bench": a.bench, "data": scoring.fingerprint(a.data), "images": a.images and str(Path(a.images).resolve()),
           "ckpt": [scoring.fingerprint(c) for c in a.ckpt], "hd_num": a.hd_num, "max_length": a.max_length,
           "dtype": str(device_kwargs(a)["dtype"])}
    if scoring.start(a.scores_dir, run, a.resume, "metrics.json", rank, world):
        common.teardown_distributed(world)
        return report(json.loads(Path(a.scores_dir, "metrics.json").read_text()), None)
    if a.out and a.resume:   # checked after `start`: a finished run's report names no --out and writes nothing
        data.refuse_existing([a.out], inputs=[a.data])
    result = score_to_disk(a, rows, a.scores_dir, rank, world)
    common.teardown_distributed(world)
    return report(result, a.out) if rank == 0 else None


def score_to_disk(a, rows, out, rank, world):
    """Score this rank's share of the rows into OUT/scoring (scoring.py); on rank 0, merge them into
    OUT/scores.jsonl and return the metrics, also written to OUT/metrics.json (last: it marks the run finished).
    A row whose score is NaN counts as wrong, and the metrics count such rows (nan_rows)."""
    rms = [RewardModel.from_pretrained(c, **device_kwargs(a)) for c in a.ckpt]

    def name(i):
        return f"{a.data} row {i + 1} (id {rows[i]['id']!r})"
    scoring.score_rows(out, len(rows), lambda i: row_tokens(rms[0], a.bench, rows[i], a.images, a.hd_num),
                       lambda b: [{k: v for k, v in r.items() if k != "id"} for r in
                                  score_benchmark(rms, a.bench, rows, a.images, a.hd_num, indices=b)],
                       name, a.token_budget, a.on_error, rank, world, a.max_length)
    if rank != 0:
        return None
    records = [{"id": row["id"], **{k: v for k, v in rec.items() if k != "row"}}
               for row, rec in zip(rows, scoring.merged(out, len(rows)))]
    skipped = [{"id": r["id"], "row": i + 1, "reason": r["error"]} for i, r in enumerate(records) if "error" in r]
    keep = [i for i, r in enumerate(records) if "error" not in r]
    data.atomic_write_text(Path(out, "scores.jsonl"), "".join(
        json.dumps(finite_or_null(r)) + "\n" for r in records))
    result = benchmark_metrics(a.bench, [rows[i] for i in keep], [records[i] for i in keep])
    def nan(rec):
        return any(math.isnan(x) for k, v in rec.items() if k != "id" for x in (v if isinstance(v, list) else [v]))
    result.update(nan_rows=sum(nan(records[i]) for i in keep), skipped=skipped)
    if result["nan_rows"]:
        print(f"warning: {result['nan_rows']} rows have a NaN score, counted as wrong", file=sys.stderr)
    data.atomic_write_text(Path(out, "metrics.json"), json.dumps(finite_or_null(result), indent=2, default=float))
    return result


def report(result, out):
    text = json.dumps(finite_or_null(result), indent=2, default=float)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
    return result

if __name__ == "__main__":
    data.run_cli(main)
