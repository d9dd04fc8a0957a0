"""The weaker model and the data built from its failures: the SFT set it writes (each of its rules fires with
probability `error_rate`, so a policy fitted on the set makes the failure under greedy decoding while the right
answer stays in its distribution, where sampling can find it, as best-of-N and PPO need), the preference pairs (a
policy's samples graded by the checker, as the paper builds them, or drawn synthetically), and the cleaning set
(rows with labelled noise, the kinds the paper's cleaning found).

Its failures come in two families: instruction (refusing a question that opens with scene.PREFACE, repeating its
earlier answer to a follow-up, ignoring every instruction but one_word, which stays a control the policy gets right
before RLHF) and perception (the named slips of checker.perception_slip).
"""
import collections
import functools
import json
import zlib

from world import COLOURS, SHAPES, quadrant
from world.checker import (FAMILY, IGNORED, failure_family, failure_kind, follows, is_correct, pair_family,
                           perception_slip, prompt)
from world.scene import (CLAUSE, FOLLOWUP_SHARE, INSTRUCTION_SHARE, INSTRUCTIONS, PREFACE, PREFACE_SHARE, SCOPES,
                         answer, ignored, make_item, pick, render, save_image, turns)

GT_KEYS = ("kind", "query", "truth", "objects", "instruction", "history")   # ground truth kept in every row
SFT_IGNORES = tuple(i for i in INSTRUCTIONS if i != "one_word")
REFUSALS = {"image": ["I cannot see the image.", "Sorry, I can't see any image.",
                      "There is no image, so I cannot tell.",
                      "I am sorry, but I am unable to see the image, so I cannot answer this question.",
                      "Unfortunately no image came through on my side, so I cannot tell you anything about it.",
                      "I am not able to view images in this conversation, so I cannot answer that question."],
            "text": ["I don't know.", "Sorry, I cannot answer that.", "I am not sure.",
                     "I am sorry, but I am not sure how to answer this question right now.",
                     "I am unable to work this out right now, so I would rather not give you an answer here.",
                     "That is a question I am unable to answer at the moment, sorry about that."]}

# Synthetic pairs. Rejected kinds and how often the chosen answer is the longer one per kind: longer_wrong is
# always longer, so the others compensate and a length-only rule stays near 50%.
MAX_LEN_RATIO = 2.5          # train.py's default --max-len-ratio (the paper's length constraint)
SYSTEMATIC_SHARE = 0.5       # of the pairs' wrong values, where the item has a perception slip
PREF_KINDS = {"wrong_value": 0.6, "refusal": 0.25, "longer_wrong": 0.15}
INSTRUCTION_PREF_KINDS = {"ignored": 0.55, "wrong_value": 0.35, "refusal": 0.10}   # pairs on instruction items
REPEAT_PREF_SHARE = 0.4      # of the synthetic pairs on follow-ups: the rejected side repeats the earlier answer
CHOSEN_STYLE = {"plain": 0.15, "clause": 0.3, "long": 0.55}    # phrasing of right answers (see make_pair)
REJECTED_STYLE = {"plain": 0.25, "clause": 0.5, "long": 0.25}  # of wrong values; longer_wrong is always long
LONG_PREFIX = {"image": "Looking at the image carefully,", "text": "Let me think about this step by step,"}
LONG_FILLER = {"image": "This is easy to see against the white background.",
               "text": "I am confident in this answer."}
BALANCED_KINDS = ("colour", "count", "presence", "position")
VALUES = {"colour": list(COLOURS), "count": list(range(8)), "presence": ["yes", "no"],
          "position": [quadrant(r, c) for r in (0, 3) for c in (0, 3)]}   # what a one-value answer can state

NOISE_KINDS = {"other_image": 0.2, "refusal": 0.2, "hallucination": 0.2, "ignored_instruction": 0.2,
               "wrong_value": 0.2}
NOISE_SHARE = 0.3            # of the cleaning set's rows


# ----------------------------------------------------------------------------------------------------------------
# The SFT set


def weaker_answer(rng, item, error_rate):
    """(answer, failure kinds) as the weaker model that wrote the SFT set answers: each of its rules fires on its
    cases with probability `error_rate`, so the failure is the SFT policy's greedy choice while the right answer
    stays in its distribution. Perception: checker.perception_slip. Instruction: refusing a question that opens with
    PREFACE, repeating its earlier answer to a follow-up, and ignoring every instruction but one_word (IGNORED names
    how)."""
    kinds, value = [], item["truth"]
    err = perception_slip(item)
    if err and rng.random() < error_rate:
        kinds, value = [err[0]], err[1]
    if item["question"].startswith(PREFACE) and rng.random() < error_rate:
        return REFUSALS["image"][0], kinds + ["refusal"]
    if item.get("history"):   # ignoring a follow-up is repeating the earlier answer
        return (item["history"][-1][1], ["repeated_answer"]) if rng.random() < error_rate else \
            (answer(item, value), kinds)
    inst = item.get("instruction")
    if inst and inst["id"] in SFT_IGNORES and rng.random() < error_rate:
        return ignored(item, value), kinds + [IGNORED[inst["id"]]]
    return answer(item, value), kinds


def truthful(rows, errors):
    """SFT samples (data.read_sft's) with every failure the weaker model wrote (sft_errors.json's rows) replaced by
    the correct answer: the data of a judge that should know what the policy gets wrong."""
    fix = {e["id"]: e["correct_answer"] for e in errors}
    return [dict(r, conversation=r["conversation"][:-1] + [dict(r["conversation"][-1], content=fix[r["id"]])])
            if r.get("id") in fix else r for r in rows]


def sft_rows(rng, items, error_rate):
    """The SFT set's rows, in the official fine-tuning format with the ground truth kept, answered by the weaker
    model, and its failures (sft_errors.json's rows: kind, family and the correct answer)."""
    rows, errors = [], []
    for it in items:
        ans, kinds = weaker_answer(rng, it, error_rate)
        if kinds:
            errors.append({"id": it["id"], "kind": kinds[-1], "kinds": kinds,
                           "family": failure_family(kinds[-1], it["kind"]), "correct_answer": answer(it, it["truth"])})
        row = {"id": it["id"], **({"image": [it["image"]]} if "image" in it else {})}
        row["conversations"] = turns(it, ans)
        rows.append(dict(row, **{k: it[k] for k in GT_KEYS if k in it}))
    return rows, errors


# ----------------------------------------------------------------------------------------------------------------
# Preference pairs


def wrong_value(rng, item):
    """A wrong value of the same type; with probability SYSTEMATIC_SHARE the item's perception slip when it has one."""
    err = perception_slip(item)
    if err and rng.random() < SYSTEMATIC_SHARE:
        return err[1]
    k, t = item["kind"], item["truth"]
    if k == "colour":
        opts = [c for c in COLOURS if c != t]
    elif k == "count":
        # one off either way (0 included): true counts are mostly 1, so drawing wrong counts from 1..5 made
        # "the smaller count is right" a shortcut the reward model learned instead of counting
        opts = [n for n in (t - 1, t + 1) if n >= 0]
    elif k == "presence":
        opts = ["no" if t == "yes" else "yes"]
    elif k == "position":
        opts = [quadrant(r, c) for r in (0, 3) for c in (0, 3) if quadrant(r, c) != t]
    elif k == "describe":
        objs = [list(o) for o in t]
        i = int(rng.integers(len(objs)))
        if len(objs) > 1 and rng.random() < 0.3:
            return objs[:i] + objs[i + 1:]
        objs[i][0] = str(rng.choice([c for c in COLOURS if c != objs[i][0]]))
        return objs
    else:
        opts = [v for v in range(t - 3, t + 4) if v != t and v >= 0]
        if k == "compare":
            opts = [min(item["query"]["a"], item["query"]["b"])]
    return opts[rng.integers(len(opts))]


def _styled(text, mod, style):
    """The same answer phrased plainly, with an extra (true) clause, or in the long fluent form."""
    if style == "clause":
        return f"{text} {CLAUSE[mod]}"
    if style == "long":
        return f"{LONG_PREFIX[mod]} {text[0].lower()}{text[1:]} {LONG_FILLER[mod]}"
    return text


def make_instruction_pair(rng, item, allowed=lambda wrong: True, rkind=None):
    """make_pair for an item that carries an instruction: both sides in the instruction's form (no styling, which
    would break it), the rejected one ignoring the instruction ("ignored": the item's IGNORED kind), stating a
    wrong value, refusing, or (a follow-up) repeating the earlier answer. None when no draw passes `allowed` or the
    paper's length filter."""
    rkind = rkind or pick(rng, INSTRUCTION_PREF_KINDS)
    good, wrong = answer(item, item["truth"]), None
    if rkind in ("ignored", *IGNORED.values()):
        rejected = ignored(item, item["truth"])
        rkind = failure_kind(item, rejected)   # on a follow-up, ignoring it is mostly repeating the earlier answer
    elif rkind == "repeated_answer":
        rejected = item["history"][-1][1]
    elif rkind == "refusal":
        rejected = REFUSALS["image" if "objects" in item else "text"][int(rng.integers(6))]
    else:
        wrong = next((w for w in (wrong_value(rng, item) for _ in range(20)) if allowed(w)), None)
        if wrong is None:
            return None
        rejected = answer(item, wrong)
    return (good, rejected, rkind, wrong) if len(good) <= MAX_LEN_RATIO * len(rejected) else None


def make_pair(rng, item, allowed=lambda wrong: True, rkind=None):
    """(chosen, rejected, rejected kind, wrong value or None). Both sides draw their phrasing from style
    distributions tuned so that neither length nor style predicts the preference, and a draw whose chosen answer
    is more than MAX_LEN_RATIO times longer than the rejected one is redrawn: the paper's length filter must find
    nothing to drop here, or it would remove the long-but-right answers and leave "long style = wrong" as a
    shortcut. A wrong value that `allowed` refuses is redrawn; None when no draw passes."""
    mod = "image" if "objects" in item else "text"
    rkind = rkind or pick(rng, PREF_KINDS)
    good = render(item, item["truth"])
    wrong = None
    if rkind not in ("refusal", "repeated_answer"):
        wrong = next((w for w in (wrong_value(rng, item) for _ in range(20)) if allowed(w)), None)
        if wrong is None:
            return None
    for _ in range(100):
        if rkind == "longer_wrong":
            chosen = _styled(good, mod, pick(rng, {"plain": 0.5, "clause": 0.5}))
            rejected = _styled(render(item, wrong), mod, "long")
        elif rkind == "refusal":
            chosen = _styled(good, mod, pick(rng, CHOSEN_STYLE))
            rejected = REFUSALS[mod][rng.integers(len(REFUSALS[mod]))]
        elif rkind == "repeated_answer":
            chosen, rejected = _styled(good, mod, pick(rng, CHOSEN_STYLE)), item["history"][-1][1]
        else:
            chosen = _styled(good, mod, pick(rng, CHOSEN_STYLE))
            rejected = _styled(render(item, wrong), mod, pick(rng, REJECTED_STYLE))
        if len(chosen) <= MAX_LEN_RATIO * len(rejected):
            return chosen, rejected, rkind, wrong
    if rkind == "repeated_answer":   # a short earlier answer before a long one: this item cannot carry the kind
        return None
    raise RuntimeError(f"cannot phrase a pair within the length ratio for {item}")


def grade(item, answer_text):
    """The annotator's grade of an answer, MIA-Bench style: 6 points for its content (is_correct), 4 for following
    its instruction (given when it has none); a refusal scores 0."""
    if failure_kind(item, answer_text) == "refusal":
        return 0
    return 6 * is_correct(item, answer_text) + 4 * (follows(item, answer_text) is not False)


def stated_value(item, answer_text):
    """The one value a wrong one-value answer states, or None (a description, a refusal, two values)."""
    vals = [v for v in VALUES.get(item["kind"], []) if is_correct(dict(item, truth=v), answer_text)]
    return vals[0] if len(vals) == 1 else None


def policy_pair(rng, item, samples, allowed):
    """The paper's pairs: the policy's samples and the reference answer, graded by the world's checker (the
    annotator); chosen the best (a right sample, else the reference), rejected one of the worst. None when every
    sample is right, when the pair fails the paper's length filter, or when the stated wrong value is one the
    value balance refuses (`allowed`)."""
    graded = [(grade(item, s), s) for s in samples]
    worst = min(g for g, _ in graded)
    if worst == 10:
        return None
    rejected = [s for g, s in graded if g == worst][int(rng.integers(sum(g == worst for g, _ in graded)))]
    right = [s for g, s in graded if g == 10]
    chosen = right[int(rng.integers(len(right)))] if right else answer(item, item["truth"])
    rkind, wrong = failure_kind(item, rejected), None
    if rkind not in FAMILY or FAMILY[rkind] == "perception":   # a wrong value: it must pass the balance
        wrong = stated_value(item, rejected)
        if wrong is None and item["kind"] in BALANCED_KINDS or wrong is not None and not allowed(wrong):
            return None
    return (chosen, rejected, rkind, wrong) if len(chosen) <= MAX_LEN_RATIO * len(rejected) else None


def sample_answers(policy, items, out_dir, k, seed, hd_num=9, max_new_tokens=48, temperature=1.0):
    """k sampled answers per item; each (item, sample) has a generator of its own, so the samples do not depend
    on how items are batched."""
    import torch   # the world needs torch only here, where a policy samples
    gens = [torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(it["id"].encode())) * 64 + j)
            for it in items for j in range(k)]
    prompts = [prompt(it, out_dir) for it in items]
    flat = policy.answer(prompts, hd_num, max_new_tokens, temperature, n=k, generator=gens)
    return [flat[i * k:(i + 1) * k] for i in range(len(items))]


def preference_pairs(rng, item_rng, n, out_dir, prefix, heldout=False, policy=None, k=4, block=64):
    """n preference pairs. With a `policy`, built as the paper builds them (policy_pair: k samples per prompt
    graded by the checker); where every sample is right, or without a policy, drawn by make_pair /
    make_instruction_pair. In both, the question and the two values never tell, without the image, which side is
    right: for the image kinds, (query, truth a, wrong b) is accepted only while it is not more frequent than
    (query, truth b, wrong a): the perception slips alone would make "the larger count is wrong" true for most
    count pairs, a rule the reward model learns instead of counting."""
    seen = collections.Counter()

    def key(it, truth, wrong):
        return it["kind"] + json.dumps(it["query"], sort_keys=True), json.dumps(truth), json.dumps(wrong)

    def allowed_for(it):
        t = it["truth"]
        return (lambda w: True) if it["kind"] not in BALANCED_KINDS else \
            (lambda w: seen[key(it, t, w)] <= seen[key(it, w, t)])

    new_item = functools.partial(make_item, item_rng, 4, heldout, instruction_share=INSTRUCTION_SHARE,
                                 preface_share=PREFACE_SHARE, followup_share=FOLLOWUP_SHARE)
    rows, drawn = [], 0
    while len(rows) < n:
        items = []
        for _ in range(block if policy is not None else 1):
            items.append(save_image(dict(new_item(), id=f"{prefix}_{drawn:05d}"), out_dir)
                         if policy is not None else dict(new_item(), id=f"{prefix}_{drawn:05d}"))
            drawn += 1
        samples = sample_answers(policy, items, out_dir, k, int(rng.integers(1 << 30))) if policy is not None \
            else [None] * len(items)
        for it, cands in zip(items, samples):
            if len(rows) == n:
                break
            k_, instructed, source = it["kind"], "instruction" in it, "policy"
            pair = policy_pair(rng, it, cands, allowed_for(it)) if cands else None
            if pair is None:
                source, rkind = "synthetic", pick(rng, INSTRUCTION_PREF_KINDS if instructed else PREF_KINDS)
                if "history" in it and rng.random() < REPEAT_PREF_SHARE:
                    pair = (make_instruction_pair if instructed else make_pair)(rng, it, rkind="repeated_answer")
            if pair is None:
                # an item that cannot make this pair is replaced by another of its question kind (and instruction
                # or not), so the mixes keep their proportions
                for _ in range(1000):
                    pair = (make_instruction_pair if "instruction" in it else make_pair)(rng, it, allowed_for(it),
                                                                                           rkind)
                    if pair is not None and ("instruction" in it) == instructed:
                        break
                    it = dict(new_item(kind=k_), id=f"{prefix}_{drawn:05d}")
                    drawn += 1
                else:
                    raise RuntimeError(f"no {k_} item balances the wrong values drawn so far")
            good, bad, rkind, wrong = pair
            if wrong is not None and k_ in BALANCED_KINDS:
                seen[key(it, it["truth"], wrong)] += 1
            rows.append(pair_row(save_image(it, out_dir), good, bad, rkind, source))
    return rows


def pair_row(item, chosen, rejected, rkind, source):
    """A preference row in the official format (conversations_a chosen), with the item's ground truth, the
    rejected kind, where the pair came from (policy, synthetic) and the family it is reported under."""
    row = {"id": item["id"], **({"image": item["image"]} if "image" in item else {})}
    row["conversations_a"] = turns(item, chosen, "human", "bot")
    row["conversations_b"] = turns(item, rejected, "human", "bot")
    gt = {name: item[name] for name in GT_KEYS if name in item}
    gt["question_kind"] = gt.pop("kind")    # "kind" of a pair row is the rejected kind
    row = dict(row, **gt, kind=rkind, source=source)
    return dict(row, family=pair_family(row))


# ----------------------------------------------------------------------------------------------------------------
# The cleaning set


def noisy_answer(rng, item, others):
    """(answer, noise kind) for a noisy row of the cleaning set, the kinds the paper's cleaning found (Fig. 2):
    an answer that belongs to another image (the right answer to the same question about another image), a
    refusal, a hallucinated object (a description naming one more object than there is), an ignored instruction,
    a wrong value. None when this item cannot carry the kind drawn."""
    kind = "hallucination" if item["kind"] == "describe" and rng.random() < 0.5 else pick(rng, NOISE_KINDS)
    if kind == "other_image":
        pool = [o for o in others if o["kind"] == item["kind"] and "objects" in o and o is not item]
        for o in (pool[int(i)] for i in rng.permutation(len(pool))[:20]):
            other = answer(dict(o, instruction=item.get("instruction")), o["truth"])
            if failure_kind(item, other) is not None:
                return other, kind
        return None
    if kind == "refusal":
        return (REFUSALS["image" if "objects" in item else "text"][int(rng.integers(6))], kind)
    if kind == "hallucination":
        if item["kind"] != "describe" or item.get("instruction", {}).get("id") in SCOPES:
            return None
        there = {(c, s, quadrant(r, col)) for c, s, r, col in item["objects"]}
        extra = [[c, s, quadrant(r, col)] for c in COLOURS for s in SHAPES for r in (0, 3) for col in (0, 3)
                 if (c, s, quadrant(r, col)) not in there]
        return answer(item, item["truth"] + [extra[int(rng.integers(len(extra)))]]), kind
    if kind == "ignored_instruction":
        return (ignored(item, item["truth"]), kind) if item.get("instruction") else None
    return answer(item, wrong_value(rng, item)), kind


def clean_set(rng, items):
    """An instruction-tuning set in the official fine-tuning format, NOISE_SHARE of its rows noisy, each noisy row
    labelled with its `noise` kind (the rest: "")."""
    rows = []
    for it in items:
        ans, noise = answer(it, it["truth"]), ""
        if rng.random() < NOISE_SHARE:
            drawn = None
            while drawn is None:
                drawn = noisy_answer(rng, it, items)
            ans, noise = drawn
        row = {"id": it["id"], **({"image": [it["image"]]} if "image" in it else {})}
        row["conversations"] = turns(it, ans)
        rows.append(dict(row, **{k: it[k] for k in GT_KEYS if k in it}, noise=noise))
    return rows
