"""IXC-2.5-Reward: the `score` head on the IXC-2.5 trunk, the official scoring API, and the benchmark metrics.

    python reward.py --ckpt DIR --conv chat.json [--image a.png ...] [--hd-num 24]
    python reward.py eval --bench vl_rewardbench --data FILE (--ckpt DIR [--images DIR] | --scores FILE)

The score is `score(norm(h))` read at the last real position, which with the reward template holds the reward token
`[UNUSED_TOKEN_130]` (the official remote code). API semantics follow the official remote code, including its quirks:
several images force hd_num 6, truncation at max_length can cut the reward token, `rank` returns indices best first.
"""
import argparse
import json
import math
import random
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import data
from data import reward_template
from data import atomic_write_text
from model import InternLMXComposer2, PrefixKV, add_device_args, device_kwargs


def pool_last(rewards, attention_mask):
    """The reward at the last real position of each row (upstream: argmax of cumsum(attention_mask))."""
    return rewards.gather(1, attention_mask.cumsum(1).argmax(1)[:, None]).squeeze(1)


class RewardModel(InternLMXComposer2):
    """Load with `RewardModel.from_pretrained(dir)`: the head is `score.weight` [1, D] (or BaseReward's MLP)."""

    def forward(self, embeds, im_mask=None, attention_mask=None, position_ids=None, cache=None):
        """Reward at every position [B, L] (float32); the critic reads it at every response token."""
        h = self.model(embeds, im_mask, attention_mask, position_ids, cache)
        return self.score(h).float().squeeze(-1)

    def encode(self, conversation, images=(), hd_num=24, max_length=16384, apply_template=True):
        """A conversation (list of {"role", "content"}) or, with apply_template=False, a formatted string."""
        return self.encode_many([conversation], [images], hd_num, max_length, apply_template)[0]

    def encode_many(self, conversations, images, hd_num=24, max_length=16384, apply_template=True,
                    train_transform=False):
        """Each conversation -> (embeds, im_mask), cut at max_length as upstream; all images in one ViT batch."""
        for ims in images:
            if isinstance(ims, (str, bytes)):  # a bare path would otherwise be read as one image per character
                raise TypeError(f"images: expected one list of paths per conversation, got the string {ims!r}")
        seqs = [self.sequence(reward_template(conv) if apply_template else conv, ims, hd_num, train_transform)
                for conv, ims in zip(conversations, images)]
        pixels = [p for _, px in seqs for p in px]
        encoded = self.encode_images(pixels) if pixels else []
        out, k = [], 0
        for segments, px in seqs:
            embeds, im_mask, _ = self.splice(segments, encoded[k:k + len(px)])
            k += len(px)
            if embeds.shape[0] > max_length:
                what = "the reward token is cut off, so the score is read at an arbitrary position" \
                    if apply_template else "the last tokens are lost"
                warnings.warn(f"sequence of {embeds.shape[0]} tokens truncated to max_length={max_length} "
                              f"({embeds.shape[0] - max_length} dropped, as the official code does): {what}",
                              stacklevel=4)
                embeds, im_mask = embeds[:max_length], im_mask[:max_length]
            out.append((embeds, im_mask))
        return out

    def score_embedded(self, items):
        """[(embeds [L_i, D], im_mask [L_i])] -> scores [B]: right-padded with the pad token's embedding, one
        forward, each read at its last real position (padding sits after every real token, so causal attention
        keeps it out of the scores)."""
        batch = self.pad_batch(items)
        rewards = self(batch["embeds"], batch["im_mask"], batch["attention_mask"])
        return pool_last(rewards, batch["attention_mask"])

    def rewards_alone(self, seqs, max_length=None):
        """Rewards r(x, y) of (segments, pixels) sequences: one right-padded batch, each row's reward the score head
        at its last real token (the reward token). Segments are token-id lists, and an int where image i goes."""
        batch = self.embed_batch(seqs)
        L = batch["embeds"].shape[1]
        if max_length and L > max_length:
            warnings.warn(f"a sequence of {L} tokens truncated to max_length {max_length}: its reward token is lost")
            batch = {k: v[:, :max_length] for k, v in batch.items()}
        return pool_last(self(batch["embeds"], batch["im_mask"], batch["attention_mask"]), batch["attention_mask"])

    # --stage rm's default path (--share-prefix 1) is an optimisation only: read rewards_alone, above, for the math
    def pair_rewards(self, seqs, max_length=None):
        """rewards_alone's numbers for [c0, r0, c1, r1, ...] ((segments, pixels) each; a pair shares its images),
        computed faster. A pair's common prefix (image and prompt, most of its tokens) runs once and both
        answers continue from its keys/values: same numbers and gradients, a third to half less compute."""
        flat = [[t for seg in segs for t in (seg if isinstance(seg, list) else [("image", seg)])] for segs, _ in seqs]
        cut = []
        for a, b in zip(flat[0::2], flat[1::2]):
            d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            cut.append(min(d, len(a) - 1, len(b) - 1))  # every continuation keeps at least its reward token
        cuts = [c for c in cut for _ in (0, 1)]
        if min(cut) == 0 or any(isinstance(t, tuple) for f, d in zip(flat, cuts) for t in f[d:]):
            return self.rewards_alone(seqs, max_length)  # an image after the answers diverge: nothing to share
        prefixes = []
        for (segs, pixels), d in zip(seqs[0::2], cut):
            out, n = [], 0
            for seg in segs:
                if n >= d:
                    break
                out.append(seg if isinstance(seg, int) else seg[:d - n])
                n += 1 if isinstance(seg, int) else len(out[-1])
            prefixes.append((out, pixels))
        pre = self.embed_batch(prefixes, left_pad=True)
        pre_len = pre["attention_mask"].sum(1).repeat_interleave(2)
        if max_length and max(int(p) + len(f) - d for p, f, d in zip(pre_len, flat, cuts)) > max_length:
            return self.rewards_alone(seqs, max_length)  # truncation, warned about there
        cache = PrefixKV(self.cfg)
        h = self.model(pre["embeds"], pre["im_mask"], pre["attention_mask"], pre["position_ids"], cache)
        cache.repeat(2)
        cont = self.pad_batch([(e, torch.zeros(len(e), dtype=torch.bool, device=self.device))
                               for e, _, _ in self.splice_rows([([f[d:]], []) for f, d in zip(flat, cuts)])])
        position_ids = cont["position_ids"] + pre_len[:, None]
        rewards = self(cont["embeds"], cont["im_mask"], cont["attention_mask"], position_ids, cache)
        # the prefix's last-layer outputs reach no reward; keeping them in the graph gives the weights only they use
        # a zero gradient, as scoring each sequence alone does, so AdamW still decays them and optimizer states match
        return pool_last(rewards, cont["attention_mask"]) + 0.0 * h.sum()

    # The four methods below take their arguments in the official order (conversation, images, max_length, hd_num,
    # [return_logits,] apply_template), so code written for the released model passes them positionally unchanged.

    @torch.no_grad()
    def get_score(self, conversation, images=(), max_length=16384, hd_num=24, apply_template=True):
        item = self.encode(conversation, images, hd_num, max_length, apply_template)
        return self.score_embedded([item]).item()

    @torch.no_grad()
    def get_scores(self, conversations, images=None, max_length=16384, hd_num=24, apply_template=True):
        """One right-padded batch: a list of floats, or, as upstream (`squeeze().tolist()`), a bare float when there
        is a single conversation (`score_list` always returns a list)."""
        scores = self.score_list(conversations, images, max_length, hd_num, apply_template)
        return scores[0] if len(scores) == 1 else scores

    @torch.no_grad()
    def score_list(self, conversations, images=None, max_length=16384, hd_num=24, apply_template=True):
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(images)} image lists")
        return self.score_embedded(self.encode_many(conversations, images, hd_num, max_length, apply_template)).tolist()

    def compare(self, conversation1, images1, conversation2, images2, max_length=16384, hd_num=24,
                return_logits=False, apply_template=True):
        """Is conversation1 better? Two separate get_score calls, as upstream."""
        s1 = self.get_score(conversation1, images1, max_length, hd_num, apply_template)
        s2 = self.get_score(conversation2, images2, max_length, hd_num, apply_template)
        return (s1 > s2, [s1, s2]) if return_logits else s1 > s2

    def rank(self, conversations, images=None, max_length=16384, hd_num=24, return_logits=False, apply_template=True):
        """Candidate indices sorted best first (not per-candidate ranks); scores in input order."""
        scores = self.score_list(conversations, images, max_length, hd_num, apply_template)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return (order, scores) if return_logits else order


def ensemble_scores(rms, convs, images, hd_num, normalize=False):
    """Mean over reward models of their scores (each optionally standardised by its stored held-out mean/std)."""
    total = torch.zeros(len(convs))
    for rm in rms:
        s = torch.tensor(rm.score_list(convs, images, hd_num=hd_num))
        total += (s - (rm.cfg.reward_mean or 0.0)) / (rm.cfg.reward_std or 1.0) if normalize else s
    return (total / len(rms)).tolist()


DEFAULT_RM = "runs/rm"   # where `train.py --stage rm` writes by default


def reward_dirs(paths):
    """--rm as given, or the reward model the README's first command trains; a missing directory is named together
    with the command that makes it."""
    paths = paths or [DEFAULT_RM]
    for p in paths:
        if not Path(p, "config.json").is_file():
            make = ("train it first: torchrun --standalone --nproc_per_node 2 train.py --stage rm" if p == DEFAULT_RM
                    else "name a reward model directory (a train.py --stage rm output, or the released checkpoint)")
            raise FileNotFoundError(f"no reward model in {p}: {make}")
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Benchmark metrics, as the benchmarks define them (spec rlhf_anchors.md C.7); fractions in [0, 1], ties are wrong

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


def score_benchmark(rms, bench, rows, images_dir=None, hd_num=9, seed=1234):
    """Score every row with the (averaged) reward model(s); returns records in the --scores file format."""
    def scores(convs, imgs):
        return ensemble_scores(rms, convs, imgs, hd_num)
    out = []
    swaps = vl_rewardbench_order(len(rows), seed)
    for i, row in enumerate(rows):
        if bench == "vl_rewardbench":
            image = [str(Path(images_dir or ".") / row["image_path"])]
            order = [1, 0] if swaps[i] else [0, 1]  # shown in a seeded random order, as the official script
            s = scores([data.qa(row["query"], row["response"][k]) for k in order], [image, image])
            out.append({"id": row["id"], "scores": [s[order.index(0)], s[order.index(1)]]})
        elif bench == "rm_bench":
            s = scores([data.qa(row["prompt"], r) for r in row["chosen"] + row["rejected"]], [[]] * 6)
            out.append({"id": row["id"], "scores_chosen": s[:3], "scores_rejected": s[3:]})
        else:
            s = scores([data.qa(row["prompt"], row["chosen"]), data.qa(row["prompt"], row["rejected"])], [[], []])
            out.append({"id": row["id"], "score_chosen": s[0], "score_rejected": s[1]})
    return out


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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        p = argparse.ArgumentParser(prog="reward.py eval", description="benchmark accuracy of a reward model")
        p.add_argument("--bench", required=True, choices=["vl_rewardbench", "rewardbench", "rm_bench"])
        p.add_argument("--data", required=True, help="benchmark rows (JSON list or JSONL)")
        p.add_argument("--images", help="folder the rows' image_path is relative to (VL-RewardBench)")
        p.add_argument("--ckpt", nargs="+", help="reward model dir(s); several are averaged (an ensemble)")
        p.add_argument("--scores", help="precomputed scores, one JSON object per line")
        p.add_argument("--hd-num", type=data.positive_int, default=9, help="9 in the official evaluation scripts")
        p.add_argument("--out", help="also write the metrics JSON here (a new file)")
        add_device_args(p)
        a = p.parse_args(argv[1:])
        if bool(a.ckpt) == bool(a.scores):
            p.error("give exactly one of --ckpt or --scores")
        if a.out:
            data.refuse_existing([a.out], inputs=[a.data] + ([a.scores] if a.scores else []))
        rows = data.read_rows(a.data)
        check_bench_rows(a.data, a.bench, rows, scoring=bool(a.ckpt))
        if a.scores:
            records = read_scores_jsonl(a.scores, a.bench)
        else:
            rms = [RewardModel.from_pretrained(c, **device_kwargs(a)) for c in a.ckpt]
            records = score_benchmark(rms, a.bench, rows, a.images, a.hd_num)
        result = benchmark_metrics(a.bench, rows, records)
        text = json.dumps(finite_or_null(result), indent=2, default=float)
        print(text)
        if a.out:
            atomic_write_text(a.out, text + "\n")
        return result
    p = argparse.ArgumentParser(description="score one conversation with IXC-2.5-Reward")
    p.add_argument("--ckpt", required=True, nargs="+", help="reward model dir(s); several are averaged")
    p.add_argument("--conv", required=True, help='JSON file: [{"role": "user", "content": ...}, ...]')
    p.add_argument("--image", nargs="*", default=[], help="image or video path(s), in placeholder order")
    p.add_argument("--hd-num", type=data.positive_int, default=24)
    p.add_argument("--max-length", type=data.positive_int, default=16384)
    add_device_args(p)
    a = p.parse_args(argv)
    try:
        conversation = json.loads(Path(a.conv).read_text())
    except (OSError, json.JSONDecodeError) as e:
        p.error(f"cannot read conversation {a.conv}: {e}")
    rms = [RewardModel.from_pretrained(c, **device_kwargs(a)) for c in a.ckpt]
    scores = [rm.get_score(conversation, a.image, a.max_length, a.hd_num) for rm in rms]
    print(f"{sum(scores) / len(scores):.6f}")


if __name__ == "__main__":
    data.run_cli(main)
