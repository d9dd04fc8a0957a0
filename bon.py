"""Best-of-N sampling with IXC-2.5-Reward: the prompt (with its image) is prefilled once, its KV cache copied into
N rows, N responses sampled in one batch, all N scored by the reward model in one batch, the best returned.

    python bon.py --n 4 --rm runs/rm                     # built-in world: held-out accuracy for N = 1, 2, 4, 8
    python bon.py --n 4 --rm runs/rm --fresh 1200 --seed 1 --out runs/bon-1200   # on 1200 new held-out prompts
    python bon.py --n 4 --policy CHAT_DIR --rm RM_DIR --image photo.jpg --prompt "What is in the image?" --show
"""
import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path

import torch

import common
import data
import scoring
from world import WORLD_DIR, WORLD_SFT, checker, scene, store
from model import InternLMXComposer2, add_device_args, device_kwargs
from reward import DEFAULT_RM, RewardModel, ensemble_scores, reward_dirs



@torch.no_grad()
def sample_candidates(policy, prompts, n, hd_num=9, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=0, first=0):
    """[(query, images[, history])] -> n sampled answers per prompt; one shared prefill per prompt (KVCache.repeat).
    Candidate j of the prompt at place q in its file (`first + i`, or `first[i]` when `first` lists the places) has
    a generator of its own, so its sample does not depend on how prompts are batched or dealt to ranks (and the
    first candidate of the first prompt draws from `seed` itself: best-of-1 is plain sampling)."""
    places = range(first, first + len(prompts)) if isinstance(first, int) else first
    gens = [torch.Generator(device=policy.device).manual_seed(seed + 1_000_003 * (q * 65_537 + j))
            for q in places for j in range(n)]
    answers = policy.answer(prompts, hd_num, max_new_tokens, temperature, top_p, n=n, generator=gens)
    return [answers[i * n:(i + 1) * n] for i in range(len(prompts))]


def pick_best(scores, k):
    """The best of the first k candidates; a NaN score (a broken forward) never wins, and is counted."""
    return max(range(k), key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])


def best_of_n(policy, rms, query, images=(), n=4, hd_num=24, temperature=1.0, top_p=1.0, max_new_tokens=512,
              seed=0, normalize=False):
    """One prompt -> (best answer, all answers, their scores)."""
    images = list(images)
    candidates = sample_candidates(policy, [(query, images)], n, hd_num, temperature, top_p, max_new_tokens, seed)[0]
    scores = ensemble_scores(rms, [data.qa(query, c) for c in candidates], [images] * n, hd_num, normalize)
    return candidates[pick_best(scores, n)], candidates, scores


def world_items(a, rank, world):
    """The held-out prompts evaluated: --prompts, --fresh ones (written by rank 0 under OUT/prompts) or the world's."""
    if a.fresh:
        path = Path(a.out) / "prompts" / "heldout_prompts.json"
        if rank == 0 and not path.is_file():
            store.write_heldout(path.parent, a.fresh, a.seed)
        scoring.barrier(world)
        return store.heldout_items(path)
    return store.heldout_items(a.prompts or store.ensure_world(a.world_dir)["heldout_prompts"])[:a.limit]


def world_eval(policy, rms, a, rank=0, world=1):
    """Held-out world prompts: sample max(N) candidates once; best-of-k uses the first k (nested, so the curve is
    monotone in expectation and cheap). Reports accuracy and the chosen answers' mean length per k. With --fresh,
    the prompts are new held-out ones drawn from --seed, so that each seed is an independent replicate. Each rank
    samples and scores its share of the prompts into OUT/scoring (scoring.py); rank 0 merges and returns the
    summary (the others None)."""
    items = world_items(a, rank, world)
    ks = sorted({1, 2, 4, 8, a.n})
    K = max(ks)
    prompts = [checker.prompt(it, it["_dir"]) for it in items]
    t0 = time.time()

    def score(rows):
        cs = sample_candidates(policy, [prompts[q] for q in rows], K, a.hd_num, a.temperature, a.top_p,
                               a.max_new_tokens, a.seed, first=rows)
        convs = [data.from_official(scene.turns(items[q], c)) for q, row in zip(rows, cs) for c in row]
        imgs = [prompts[q][1] for q, row in zip(rows, cs) for _ in row]
        flat = ensemble_scores(rms, convs, imgs, a.hd_num, a.normalize)
        return [{"candidates": row, "scores": flat[i * K:(i + 1) * K]} for i, row in enumerate(cs)]

    def name(q):
        return f"prompt {q + 1} ({items[q]['kind']}: {items[q]['question']!r})"

    # every prompt counts as 1 token: --batch prompts per generation call
    scoring.score_rows(a.out, len(items), lambda q: 1, score, name, a.batch, a.on_error, rank, world)
    if rank != 0:
        return None
    records = scoring.merged(a.out, len(items))
    skipped = [{"prompt": q + 1, "reason": r["error"]} for q, r in enumerate(records) if "error" in r]
    items = [it for it, r in zip(items, records) if "error" not in r]
    cands = [r["candidates"] for r in records if "error" not in r]
    scores = [r["scores"] for r in records if "error" not in r]
    return summarize(items, cands, scores, ks, a, skipped, round(time.time() - t0, 1), world)


def summarize(items, cands, scores, ks, a, skipped=(), seconds=None, world=1):
    """Best-of-k accuracy and the reward model's right-over-wrong rate on the policy's samples, from each prompt's
    candidates and their scores."""
    # right: correct content and following the instruction; a wrong sample's failure kind names what is wrong
    fails = [[checker.failure_kind(it, c) for c in cs] for it, cs in zip(items, cands)]
    right = [[f is None for f in fs] for fs in fails]
    result = {"accuracy_by_n": {}, "oracle_by_n": {}, "mean_length_by_n": {}, "accuracy_by_n_by_kind": {},
              "accuracy_by_n_by_family": {}}
    for k in ks:
        picks = [pick_best(sc, k) for sc in scores]
        ok = [r[p] for r, p in zip(right, picks)]
        result["accuracy_by_n"][str(k)] = sum(ok) / len(ok)
        result["oracle_by_n"][str(k)] = sum(any(r[:k]) for r in right) / len(right)  # a perfect reward model
        result["mean_length_by_n"][str(k)] = sum(len(c[p]) for c, p in zip(cands, picks)) / len(picks)
        result["accuracy_by_n_by_kind"][str(k)] = _means((it["kind"], o) for it, o in zip(items, ok))
        # by family: instruction following of the picks on prompts with an instruction, content accuracy of the
        # picks on first-turn image prompts (perception), first-turn text prompts and follow-ups
        result["accuracy_by_n_by_family"][str(k)] = _means(
            [("instruction", checker.follows(it, c[p])) for it, c, p in zip(items, cands, picks)
             if it.get("instruction")]
            + [(checker.content_family(it), checker.is_correct(it, c[p]))
               for it, c, p in zip(items, cands, picks)])
    # Best-of-N can only gain where the reward model ranks the policy's own right samples over its wrong ones:
    # per failure kind of the wrong sample
    hits = [(fs[j], checker.failure_family(fs[j], it["kind"]), sc[i] > sc[j], q)
            for q, (it, fs, r, sc) in enumerate(zip(items, fails, right, scores))
            for i in range(len(r)) if r[i] for j in range(len(r)) if not r[j]]
    result["rm_accuracy_on_samples_by_kind"] = _means((kd, h) for kd, _, h, _ in hits)
    result["rm_accuracy_on_samples_se_by_kind"] = {kd: clustered_se([(q, h) for k, _, h, q in hits if k == kd])
                                                   for kd in result["rm_accuracy_on_samples_by_kind"]}
    result["sample_pairs_by_kind"] = {kd: n for kd, n in sorted(collections.Counter(kd for kd, *_ in hits).items())}
    # a prompt with r right and w wrong samples gives r * w pairs: a kind's prompts are its real sample size
    result["sample_prompts_by_kind"] = {kd: len({q for k, *_, q in hits if k == kd})
                                        for kd in result["sample_pairs_by_kind"]}
    # a wrong value's family follows its question: perception on an image, text otherwise
    result["kind_family"] = {kd: sorted({fam for k, fam, *_ in hits if k == kd}) for kd in result["sample_pairs_by_kind"]}
    result["rm_accuracy_on_samples_by_family"] = _means((fam, h) for _, fam, h, _ in hits)
    # a wrong value spans families: the same pairs per family, then per kind within it
    result["rm_accuracy_on_samples_by_family_and_kind"] = {
        fam: _means((kd, h) for kd, f, h, _ in hits if f == fam) for fam in result["rm_accuracy_on_samples_by_family"]}
    result.update(n=a.n, prompts=len(items), fresh=bool(a.fresh), seconds=seconds, rm=a.rm, policy=str(a.policy),
                  seed=a.seed, temperature=a.temperature, matmul_gflops=common.matmul_gflops(), processes=world,
                  nan_scores=sum(math.isnan(x) for sc in scores for x in sc), skipped=list(skipped))
    return result


def clustered_se(hits):
    """Standard error of a pooled right-over-wrong rate from (prompt, hit) pairs. A prompt's pairs share its samples,
    so prompts are the independent draws: the ratio estimator's cluster-robust standard error, sqrt(G/(G-1) sum_q
    (h_q - p n_q)^2) / sum_q n_q over G prompts with n_q pairs and h_q hits (None for one prompt: no spread to
    measure; 0 when every pair agrees, and low with few prompts)."""
    per = collections.defaultdict(lambda: [0, 0])
    for q, h in hits:
        per[q][0] += h
        per[q][1] += 1
    g, total = len(per), sum(n for _, n in per.values())
    if g < 2:
        return None
    p = sum(h for h, _ in per.values()) / total
    return (g / (g - 1) * sum((h - p * n) ** 2 for h, n in per.values())) ** 0.5 / total


def _means(pairs):
    """{key: mean of its values} from (key, value) pairs, keys sorted."""
    groups = {}
    for key, v in pairs:
        groups.setdefault(key, []).append(v)
    return {key: sum(v) / len(v) for key, v in sorted(groups.items())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("-n", "--n", type=data.positive_int, default=4, help="candidates per prompt; the built-in world "
                   "evaluates best-of-N for N = 1, 2, 4, 8 and n, from the same max(8, n) samples (under torchrun "
                   "write -n: torchrun's own parser takes --n for an abbreviation of its --nnodes)")
    p.add_argument("--rm", nargs="+", help=f"reward model dir(s); several are averaged (default: {DEFAULT_RM})")
    p.add_argument("--policy", default=str(WORLD_SFT), help="chat model dir (default: the world's SFT policy)")
    p.add_argument("--prompt", help="a question (default: none, the built-in world's held-out prompts are "
                   "evaluated)")
    p.add_argument("--image", nargs="*", default=[], help="image/video path(s) for --prompt (default: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--max-new-tokens", type=data.positive_int, default=48, help="answer length cap in tokens")
    p.add_argument("--hd-num", type=data.positive_int, default=9, help="max HD crops per image (the official "
                   "recipe's 9)")
    p.add_argument("--normalize", action="store_true", help="standardise each RM's scores by the held-out mean and "
                   "std its rm stage stored, before averaging")
    p.add_argument("--show", action="store_true", help="print every candidate with its score")
    p.add_argument("--limit", type=data.positive_int, help="world: the first N held-out prompts (default: all 300)")
    p.add_argument("--fresh", type=data.positive_int, help="world: draw this many new held-out prompts from --seed "
                   "(written under OUT/prompts) instead of the world's 300 (default: none)")
    p.add_argument("--batch", type=data.positive_int, default=32, help="world: prompts per generation call")
    p.add_argument("--seed", type=int, default=0, help="sampling (and --fresh's prompts)")
    p.add_argument("--out", help="world: write summary.json here (default: runs/bon; none with --prompt)")
    p.add_argument("--prompts", help="world: a file of held-out prompts in the world's format (default: the "
                   "world's heldout_prompts.json)")
    p.add_argument("--world-dir", default=str(WORLD_DIR), help="the built-in world's files, made on first use "
                   "(default: runs/world in the repository)")
    scoring.add_scoring_args(p)
    add_device_args(p)
    a = p.parse_args(argv)
    if a.prompt is None and a.out is None:
        a.out = "runs/bon"
    if a.fresh and (a.limit or a.prompts):
        p.error("--fresh N draws N prompts: --limit and --prompts apply to a file's")
    rank, world = scoring.setup(a)
    if a.out and not a.resume:
        data.refuse_existing([Path(a.out) / "summary.json"], inputs=[a.prompts] if a.prompts else [])
    a.rm = reward_dirs(a.rm)
    if a.prompt is None:
        prompts = {"fresh": a.fresh} if a.fresh else scoring.fingerprint(
            a.prompts or store.ensure_world(a.world_dir)["heldout_prompts"])
        run = {"prompts": prompts, "limit": a.limit, "policy": scoring.fingerprint(a.policy),
               "rm": [scoring.fingerprint(d) for d in a.rm], "dtype": str(device_kwargs(a)["dtype"]),
               **{k: getattr(a, k) for k in ("n", "seed", "temperature", "top_p", "max_new_tokens", "hd_num",
                                             "normalize")}}
        if scoring.start(a.out, run, a.resume, "summary.json", rank, world):
            common.teardown_distributed(world)
            return json.loads((Path(a.out) / "summary.json").read_text())
    policy = InternLMXComposer2.from_pretrained(a.policy, **device_kwargs(a))
    rms = [RewardModel.from_pretrained(d, **device_kwargs(a)) for d in a.rm]
    if a.prompt is not None:
        best, cands, scores = best_of_n(policy, rms, a.prompt, a.image, a.n, a.hd_num, a.temperature, a.top_p,
                                        a.max_new_tokens, a.seed, a.normalize)
        if a.show:
            for c, s in sorted(zip(cands, scores), key=lambda x: -x[1]):
                print(f"{s:+.4f}  {c}")
        print(best)
        return best
    result = world_eval(policy, rms, a, rank, world)
    if rank == 0:
        for k, acc in result["accuracy_by_n"].items():
            print(f"best-of-{k}: accuracy {acc:.3f} (a perfect reward model: {result['oracle_by_n'][k]:.3f}), "
                  f"mean answer length {result['mean_length_by_n'][k]:.1f} chars")
        se = {kd: "" if v is None else f" ± {v:.2f}"
              for kd, v in result["rm_accuracy_on_samples_se_by_kind"].items()}
        print("reward model on the policy's samples, right over wrong: " + ", ".join(
            f"{kd} {v:.2f}{se[kd]} ({result['sample_pairs_by_kind'][kd]} pairs, "
            f"{result['sample_prompts_by_kind'][kd]} prompts)"
            for kd, v in result["rm_accuracy_on_samples_by_kind"].items()))
        if result["nan_scores"]:
            print(f"warning: {result['nan_scores']} candidates scored NaN; none of them was picked", file=sys.stderr)
        data.atomic_write_text(Path(a.out) / "summary.json", json.dumps(result, indent=2))
    common.teardown_distributed(world)
    return result

if __name__ == "__main__":
    data.run_cli(main)
