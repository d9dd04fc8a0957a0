"""The built-in world: tiny grid-of-shapes images with known ground truth, questions, systematic SFT errors and
preference pairs, written in the official formats so that the same readers serve real and built-in data; its
checker (`is_correct`), held-out prompts and the greedy evaluation of a policy on them.

Perception is made easy on purpose: a 112x112 image is a 4x4 grid of 28-px cells, each cell is exactly one merged
vision token (2x2 ViT patches of 14 px), each object fills one cell, and the colours and shapes are few and far
apart, so that one token's pixels identify colour and shape. The world is ours, not the paper's: it lets every
command run on a laptop CPU, starting from the world's own SFT policy (checkpoints/world-sft) as the paper starts
from IXC-2.5.
"""
import collections
import io
import json
import os
import re
import sys
import zlib
from pathlib import Path
try:
    import fcntl
except ImportError:  # not POSIX: no lock (let one process write the world first)
    fcntl = None

import numpy as np
import sentencepiece as spm
from PIL import Image, ImageDraw

import data

ROOT = Path(__file__).resolve().parent
WORLD_DIR = ROOT / "runs" / "world"  # generated on first use, deterministic by seed
WORLD_SFT = ROOT / "checkpoints" / "world-sft"  # shipped: the world's pretrained policy (see its summary.json)
# the tiny model of the built-in world: 112-px crops (4x4 merged tokens per view), a few narrow layers
WORLD_CONFIG = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, plora_rank=16, max_position_embeddings=4096, max_length=512,
                    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=112, patch_size=14))

WORLD_VERSION = 6            # ensure_world rewrites a cached world written by another version
IMG, CELL, GRID, MARGIN = 112, 28, 4, 3
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
# Weights tuned with the error rules (systematic_error) so ~20% of SFT answers are wrong overall.
IMAGE_KINDS = {"colour": 0.24, "count": 0.24, "presence": 0.22, "position": 0.18, "describe": 0.12}
TEXT_KINDS = {"arith": 0.5, "compare": 0.5}
IMAGE_SHARE = 2 / 3          # official reward mix: 2 image samples : 1 text sample (preference and held-out sets)
SFT_IMAGE_SHARE = 0.9        # the tiny policy learns the text kinds in a few hundred steps; its budget goes to seeing
HELDOUT_MOD = 10             # image layouts with crc32 % 10 == 0 exist only in held-out splits
ARITH_MAX, COMPARE_MAX = 9, 20
ERROR_KINDS = ("overcount", "colour_confusion", "absent_object", "position_swap")
CONFUSED = {"green": "blue", "blue": "green"}   # the weaker model swaps the two cool hues
# Rejected kinds and how often the chosen answer is the longer one per kind: longer_wrong is
# always longer, so the others compensate and a length-only rule stays near 50%.
SYSTEMATIC_SHARE = 0.5       # of the preference pairs' wrong values, where the item has a systematic error
PREF_KINDS = {"wrong_value": 0.6, "refusal": 0.25, "longer_wrong": 0.15}
CHOSEN_STYLE = {"plain": 0.15, "clause": 0.3, "long": 0.55}    # phrasing of right answers (see make_pair)
REJECTED_STYLE = {"plain": 0.25, "clause": 0.5, "long": 0.25}  # of wrong values; longer_wrong is always long
MAX_LEN_RATIO = 2.5          # train.py's default --max-len-ratio (the paper's length constraint)
GT_KEYS = ("kind", "query", "truth", "objects")   # ground truth kept in every row for is_correct
SPECIAL_PIECES = ["[UNUSED_TOKEN_130]", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]

REFUSALS = {"image": ["I cannot see the image.", "Sorry, I can't see any image.",
                      "There is no image, so I cannot tell.",
                      "I am sorry, but I am unable to see the image, so I cannot answer this question.",
                      "Unfortunately no image came through on my side, so I cannot tell you anything about it.",
                      "I am not able to view images in this conversation, so I cannot answer that question."],
            "text": ["I don't know.", "Sorry, I cannot answer that.", "I am not sure.",
                     "I am sorry, but I am not sure how to answer this question right now.",
                     "I am unable to work this out right now, so I would rather not give you an answer here.",
                     "That is a question I am unable to answer at the moment, sorry about that."]}
REFUSAL_MARKERS = ("cannot see", "can't see", "no image", "unable", "sorry", "don't know", "not sure",
                   "cannot answer", "can't answer", "cannot tell", "can't tell", "as an ai")
CLAUSE = {"image": "I checked the whole image carefully.", "text": "I checked this carefully."}
LONG_PREFIX = {"image": "Looking at the image carefully,", "text": "Let me think about this step by step,"}
LONG_FILLER = {"image": "This is easy to see against the white background.",
               "text": "I am confident in this answer."}
NUM_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
COLOUR_RE = r"\b(" + "|".join(COLOURS) + r")\b"
SHAPE_RE = r"\b(" + "|".join(SHAPES) + r")s?\b"
NUM_RE = r"\b(\d+|" + "|".join(NUM_WORDS) + r")\b"


def quadrant(row, col):
    return ("top" if row < GRID // 2 else "bottom") + " " + ("left" if col < GRID // 2 else "right")


def layout_is_heldout(objects):
    return zlib.crc32(json.dumps(objects).encode()) % HELDOUT_MOD == 0


def sample_objects(rng, max_objects=4, heldout=False):
    """1..max_objects objects, at most one per cell, row-major order; split by layout hash."""
    while True:
        cells = sorted(rng.choice(GRID * GRID, size=rng.integers(1, max_objects + 1), replace=False))
        objs = [[str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), int(c // GRID), int(c % GRID)]
                for c in cells]
        if layout_is_heldout(objs) == heldout:
            return objs


def draw(objects):
    im = Image.new("RGB", (IMG, IMG), "white")
    d = ImageDraw.Draw(im)
    for colour, shape, row, col in objects:
        x0, y0 = col * CELL + MARGIN, row * CELL + MARGIN
        x1, y1 = x0 + CELL - 2 * MARGIN - 1, y0 + CELL - 2 * MARGIN - 1
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        elif shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return im


def _pick(rng, weights):
    return str(rng.choice(list(weights), p=np.array(list(weights.values())) / sum(weights.values())))


def _question(rng, kind, objs):
    """Returns (question, query, truth) or None when this image cannot support the kind unambiguously."""
    shapes = [o[1] for o in objs or []]
    pairs = [(o[0], o[1]) for o in objs or []]
    if kind == "colour":
        uniq = [o for o in objs if shapes.count(o[1]) == 1]
        if not uniq:
            return None
        c, s, _, _ = uniq[rng.integers(len(uniq))]
        return f"What colour is the {s}?", {"shape": s}, c
    if kind == "count":
        # Ask about a random object's attribute: size-biased, so counts >= 2 are common.
        o = objs[rng.integers(len(objs))]
        if rng.random() < 0.5:
            return f"How many {o[1]}s are there?", {"shape": o[1]}, shapes.count(o[1])
        return f"How many {o[0]} objects are there?", {"colour": o[0]}, [p[0] for p in pairs].count(o[0])
    if kind == "presence":
        if rng.random() < 0.5:
            c, s = pairs[rng.integers(len(pairs))]
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
            # Mostly hard negatives (shape present, other colour): they test binding. Many ask for the cool-hue
            # twin of a present object, where the systematic error fires.
            hard = [p for p in absent if p[1] in shapes]
            twin = [p for p in hard if (CONFUSED.get(p[0]), p[1]) in pairs]
            r = rng.random()
            pool = twin if twin and r < 0.4 else hard if hard and r < 0.7 else absent
            c, s = pool[rng.integers(len(pool))]
        return f"Is there a {c} {s}?", {"colour": c, "shape": s}, "yes" if (c, s) in pairs else "no"
    if kind == "position":
        uniq = [o for o in objs if pairs.count((o[0], o[1])) == 1]
        if not uniq:
            return None
        c, s, r, col = uniq[rng.integers(len(uniq))]
        return f"Where is the {c} {s}?", {"colour": c, "shape": s}, quadrant(r, col)
    if kind == "describe":
        return "Describe the image.", {}, [[c, s, quadrant(r, col)] for c, s, r, col in objs]
    a, b = (int(x) for x in rng.integers(1, ARITH_MAX + 1, size=2))
    if kind == "arith":
        return f"What is {a} + {b}?", {"a": a, "b": b}, a + b
    a, b = (int(x) for x in rng.choice(np.arange(1, COMPARE_MAX + 1), size=2, replace=False))
    return f"Which is larger, {a} or {b}?", {"a": a, "b": b}, max(a, b)


def make_item(rng, max_objects=4, heldout=False, kind=None, image_share=IMAGE_SHARE):
    """One question with ground truth; `max_objects` is the curriculum knob (1 = single object)."""
    image = kind in IMAGE_KINDS if kind else rng.random() < image_share
    k = kind or _pick(rng, IMAGE_KINDS if image else TEXT_KINDS)
    while True:
        objs = sample_objects(rng, max_objects, heldout) if image else None
        qa = _question(rng, k, objs)
        if qa:
            item = {"kind": k, "question": qa[0], "query": qa[1], "truth": qa[2]}
            return dict(item, objects=objs) if image else item


def render(item, value):
    """Fixed-template answer sentence stating `value` for this item's question."""
    k, q = item["kind"], item["query"]
    if k == "colour":
        return f"The {q['shape']} is {value}."
    # the answer names what it looks for right before the value (as the colour answer always did): a 4-layer
    # decoder trained from scratch learns "find the object named just before, read it" within the SFT budget, but
    # not a value that comes before the object is named ("There are 2 triangles", "Yes, there is a red one")
    if k == "count":
        noun = q["shape"] if "shape" in q else q["colour"] + " object"
        return f"The number of {noun}s is {value}."
    if k == "presence":
        return (f"A {q['colour']} {q['shape']}? Yes, there is one." if value == "yes"
                else f"A {q['colour']} {q['shape']}? No, there is none.")
    if k == "position":
        return f"The {q['colour']} {q['shape']}: {value}."
    if k == "describe":
        parts = [f"a {c} {s} in the {p}" for c, s, p in value]
        if len(parts) == 1:
            return f"There is 1 object: {parts[0]}."
        return f"There are {len(parts)} objects: {', '.join(parts[:-1])} and {parts[-1]}."
    if k == "arith":
        return f"{q['a']} + {q['b']} = {value}."
    return f"{value} is larger."


def systematic_error(item):
    """(error kind, wrong value) a weaker model would produce for this item, or None.
    Deterministic in the input so a policy fitted on it reproduces it under greedy decoding."""
    k, q, t = item["kind"], item["query"], item["truth"]
    if k == "count" and t >= 2:
        return "overcount", t + 1
    if k == "colour" and t in CONFUSED:
        return "colour_confusion", CONFUSED[t]
    if k == "presence" and t == "no" and [CONFUSED.get(q["colour"]), q["shape"]] in [o[:2] for o in item["objects"]]:
        # names an absent object: its twin of the other cool hue is there. (An earlier rule, "binds on shape
        # only", fired on every hard negative and left the SFT data no signal to learn colour-shape binding from.)
        return "absent_object", "yes"
    if k == "position" and q["shape"] == "triangle":
        v, h = t.split()
        return "position_swap", v + " " + ("right" if h == "left" else "left")
    return None


def wrong_value(rng, item):
    """A wrong value of the same type; with probability SYSTEMATIC_SHARE the systematic error when there is one."""
    err = systematic_error(item)
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


def _numbers(text):
    return [int(m) if m.isdigit() else NUM_WORDS[m] for m in re.findall(NUM_RE, text)]


def is_correct(item, answer):
    """Judge a free-form answer: parse the key value; refusals, empty answers and answers naming
    two different values are wrong."""
    a = (answer or "").strip().lower().replace("\u2019", "'")
    if not a or any(m in a for m in REFUSAL_MARKERS):
        return False
    k, q, t = item.get("question_kind", item["kind"]), item["query"], item["truth"]
    colours, shapes = set(re.findall(COLOUR_RE, a)), set(re.findall(SHAPE_RE, a))
    if k in ("colour", "count", "presence", "position"):
        if shapes - {q.get("shape")} or (k != "colour" and colours - {q.get("colour")}):
            return False                          # talks about some other object
    if k == "colour":
        return colours == {t}
    if k == "count":
        return set(_numbers(a)) == {t}
    if k == "presence":
        no = bool(re.search(r"\b(no|not|none)\b|n't", a))
        yes = bool(re.search(r"\byes\b", a)) or (not no and bool(re.search(r"\bthere (is|are)\b", a)))
        return yes != no and (yes == (t == "yes"))
    if k == "position":
        vert = set(re.findall(r"\b(top|bottom|upper|lower)\b", a.replace("upper", "top").replace("lower", "bottom")))
        horiz = set(re.findall(r"\b(left|right)\b", a))
        return len(vert) == 1 and len(horiz) == 1 and f"{vert.pop()} {horiz.pop()}" == t
    if k == "describe":
        found = re.findall(rf"{COLOUR_RE} {SHAPE_RE} (?:is )?(?:in|at) the (top|bottom) (left|right)\b", a)
        found = sorted([c, s, f"{v} {h}"] for c, s, v, h in found)
        n_colour_words = len(re.findall(COLOUR_RE, a))
        return (found == sorted(t) and n_colour_words == len(t)
                and set(_numbers(a)) <= {len(t)})
    if k == "arith":
        a = re.sub(rf"\b{q['a']}\s*\+\s*{q['b']}\b", " ", a)
        return set(_numbers(a)) == {t}
    a = re.sub(r"\bthan\s+\d+", " ", a)           # compare: "7 is larger than 4"
    return not re.search(r"\b(smaller|less|lower)\b", a) and set(_numbers(a)) == {t}


def _styled(text, mod, style):
    """The same answer phrased plainly, with an extra (true) clause, or in the long fluent form."""
    if style == "clause":
        return f"{text} {CLAUSE[mod]}"
    if style == "long":
        return f"{LONG_PREFIX[mod]} {text[0].lower()}{text[1:]} {LONG_FILLER[mod]}"
    return text


def make_pair(rng, item, allowed=lambda wrong: True, rkind=None):
    """(chosen, rejected, rejected kind, wrong value or None). Both sides draw their phrasing from style
    distributions tuned so that neither length nor style predicts the preference, and a draw whose chosen answer
    is more than MAX_LEN_RATIO times longer than the rejected one is redrawn: the paper's length filter must find
    nothing to drop here, or it would remove the long-but-right answers and leave "long style = wrong" as a
    shortcut. A wrong value that `allowed` refuses is redrawn; None when no draw passes."""
    mod = "image" if "objects" in item else "text"
    rkind = rkind or _pick(rng, PREF_KINDS)
    good = render(item, item["truth"])
    wrong = None
    if rkind != "refusal":
        wrong = next((w for w in (wrong_value(rng, item) for _ in range(20)) if allowed(w)), None)
        if wrong is None:
            return None
    for _ in range(100):
        if rkind == "longer_wrong":
            chosen = _styled(good, mod, _pick(rng, {"plain": 0.5, "clause": 0.5}))
            rejected = _styled(render(item, wrong), mod, "long")
        elif rkind == "refusal":
            chosen = _styled(good, mod, _pick(rng, CHOSEN_STYLE))
            rejected = REFUSALS[mod][rng.integers(len(REFUSALS[mod]))]
        else:
            chosen = _styled(good, mod, _pick(rng, CHOSEN_STYLE))
            rejected = _styled(render(item, wrong), mod, _pick(rng, REJECTED_STYLE))
        if len(chosen) <= MAX_LEN_RATIO * len(rejected):
            return chosen, rejected, rkind, wrong
    raise RuntimeError(f"cannot phrase a pair within the length ratio for {item}")


def _items(rng, n, out_dir, prefix, max_objects=4, heldout=False, image_share=IMAGE_SHARE):
    return [_save_image(dict(make_item(rng, max_objects, heldout, image_share=image_share), id=f"{prefix}_{i:05d}"),
                        out_dir) for i in range(n)]


def _save_image(item, out_dir):
    if "objects" in item:
        item["image"] = f"images/{item['id']}.png"
        draw(item["objects"]).save(os.path.join(out_dir, item["image"]), compress_level=1)  # 1/3 faster than 6
    return item


def _sft(rng, items, error_rate):
    rows, errors = [], []
    for it in items:
        ans, err = render(it, it["truth"]), systematic_error(it)
        if err and rng.random() < error_rate:
            errors.append({"id": it["id"], "kind": err[0], "correct_answer": ans})
            ans = render(it, err[1])
        row = {"id": it["id"], **({"image": [it["image"]]} if "image" in it else {})}
        row["conversations"] = [{"from": "user", "value": it["question"]}, {"from": "assistant", "value": ans}]
        rows.append(dict(row, **{k: it[k] for k in GT_KEYS if k in it}))
    return rows, errors


BALANCED_KINDS = ("colour", "count", "presence", "position")


def _pref(rng, item_rng, n, out_dir, prefix, heldout=False):
    """n preference pairs in which the question and the two values never tell, without the image, which side is
    right: for the image kinds, (query, truth a, wrong b) is accepted only while it is not more frequent than
    (query, truth b, wrong a). Without this, the systematic errors made "the larger count is wrong" true 92% of the
    time, and the reward model scored count pairs by that instead of counting (it then preferred the policy's
    under-counts)."""
    seen = collections.Counter()

    def key(it, truth, wrong):
        return it["kind"] + json.dumps(it["query"], sort_keys=True), json.dumps(truth), json.dumps(wrong)

    rows = []
    while len(rows) < n:
        it, rkind = make_item(item_rng, 4, heldout), _pick(rng, PREF_KINDS)
        k = it["kind"]
        # a refused item is replaced by another of its question kind, so both mixes keep their proportions
        for _ in range(1000):
            t = it["truth"]
            allowed = (lambda w: True) if k not in BALANCED_KINDS else \
                (lambda w: seen[key(it, t, w)] <= seen[key(it, w, t)])  # noqa: B023  (used before `it` changes)
            if (pair := make_pair(rng, it, allowed, rkind)) is not None:
                break
            it = make_item(item_rng, 4, heldout, kind=k)
        else:
            raise RuntimeError(f"no {k} item balances the wrong values drawn so far")
        good, bad, rkind, wrong = pair
        if wrong is not None and k in BALANCED_KINDS:
            seen[key(it, it["truth"], wrong)] += 1
        it = _save_image(dict(it, id=f"{prefix}_{len(rows):05d}"), out_dir)
        row = {"id": it["id"], **({"image": it["image"]} if "image" in it else {})}
        row["conversations_a"] = [{"from": "human", "value": it["question"]}, {"from": "bot", "value": good}]
        row["conversations_b"] = [{"from": "human", "value": it["question"]}, {"from": "bot", "value": bad}]
        gt = {name: it[name] for name in GT_KEYS if name in it}
        gt["question_kind"] = gt.pop("kind")    # "kind" of a pair row is the rejected kind
        rows.append(dict(row, **gt, kind=rkind))
    return rows


def write_world(out_dir, seed=0, n_sft=40000, n_pref=10000, n_heldout=300, n_sft_easy=2000,
                error_rate=0.7, n_pref_heldout=None):
    """Write every world file under out_dir; returns {name: path}. Deterministic by seed.
    sft_easy.json holds single-object images for an SFT curriculum warm-up. `error_rate` < 1 keeps the right
    answer in the SFT policy's distribution (greedy still picks the error), so sampling can find it: best-of-N
    and PPO need that, as they do with real models. The held-out preference pairs default to 4 x n_heldout (1200):
    with 300, the reward model's accuracy had a standard error of 0.023, too coarse to rank two recipes."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = [np.random.default_rng([seed, s]) for s in range(8)]
    sft, errs = _sft(rng[5], _items(rng[0], n_sft, out_dir, "sft", image_share=SFT_IMAGE_SHARE), error_rate)
    easy, easy_errs = _sft(rng[5], _items(rng[1], n_sft_easy, out_dir, "easy", max_objects=1,
                                          image_share=SFT_IMAGE_SHARE), error_rate)
    held = _items(rng[4], n_heldout, out_dir, "heldout", heldout=True)
    files = {"sft_train": sft, "sft_easy": easy, "sft_errors": errs + easy_errs,
             "pref_train": _pref(rng[6], rng[2], n_pref, out_dir, "pref"),
             "pref_heldout": _pref(rng[7], rng[3], n_pref_heldout or 4 * n_heldout, out_dir, "prefheld", heldout=True),
             "heldout_prompts": [dict(it, answer=render(it, it["truth"])) for it in held]}
    paths = {}
    for name, rows in files.items():
        paths[name] = os.path.join(out_dir, name + ".json")
        with open(paths[name], "w") as f:
            json.dump(rows, f, indent=1)
    return paths


def template_texts(rows):
    """Chat-templated strings of sft/pref rows (the text the tokenizer must cover)."""
    role = {"human": "user", "user": "user", "system": "system"}
    out = []
    for r in rows:
        for key in ("conversations", "conversations_a", "conversations_b"):
            if key in r:
                out.append("".join(f"[UNUSED_TOKEN_146]{role.get(m['from'], 'assistant')}\n{m['value']}"
                                   "[UNUSED_TOKEN_145]\n" for m in r[key]))
        if "question" in r:
            out.append(f"[UNUSED_TOKEN_146]user\n{r['question']}[UNUSED_TOKEN_145]\n"
                       f"[UNUSED_TOKEN_146]assistant\n{r['answer']}[UNUSED_TOKEN_145]\n")
    return out


def train_world_tokenizer(texts, model_path, vocab_size=640):
    """Small BPE SentencePiece model with the InternLM2 special-token layout (<unk>=0, <s>=1, </s>=2,
    then the three [UNUSED_TOKEN_*] user-defined pieces). Byte-identical output for identical input:
    one thread, no sentence sampling, no file path stored in the model. If the text cannot fill
    `vocab_size` pieces, the largest size it supports is used (read it back from the model)."""
    sents = list(dict.fromkeys(list(texts) + ["system", "[UNUSED_TOKEN_146]system\n[UNUSED_TOKEN_145]\n"]))
    opts = dict(
        sentence_iterator=iter(sents), model_writer=io.BytesIO(), model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=SPECIAL_PIECES,
        byte_fallback=True, add_dummy_prefix=False, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    try:
        spm.SentencePieceTrainer.train(**opts)
    except RuntimeError as e:
        # A small corpus cannot fill a large BPE vocab; sentencepiece names the maximum, so use it.
        cap = re.search(r"<= (\d+)", str(e))
        if not cap:
            raise
        opts.update(sentence_iterator=iter(sents), model_writer=io.BytesIO(), vocab_size=int(cap.group(1)))
        spm.SentencePieceTrainer.train(**opts)
    with open(model_path, "wb") as f:
        f.write(opts["model_writer"].getvalue())
    return model_path


# ----------------------------------------------------------------------------------------------------------------
# The cache on disk, held-out prompts, and a policy's accuracy on them


def ensure_world(world_dir=WORLD_DIR):
    """Write the built-in world once (deterministic by seed) and return its file paths. Every torchrun rank calls
    this: a lock file lets one write while the others wait, then read (they used to write it all at once)."""
    world_dir = Path(world_dir)
    done = world_dir / "world.json"

    def current():
        return done.is_file() and json.loads(done.read_text()).get("version") == WORLD_VERSION

    if not current():  # a complete cache is only read, so it may sit on a read-only disk
        world_dir.mkdir(parents=True, exist_ok=True)
        with open(world_dir / ".lock", "w") as lock:
            if fcntl:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not current():
                print(f"writing the built-in world (version {WORLD_VERSION}) to {world_dir}: images, data files "
                      f"and tokenizer, about a minute, once", file=sys.stderr, flush=True)
                paths = write_world(str(world_dir), seed=0)
                rows = sum((json.loads(Path(p).read_text()) for p in paths.values()), [])
                train_world_tokenizer(template_texts(rows), str(world_dir / "tokenizer.model"))
                files = {k: Path(p).name for k, p in paths.items()}
                data.atomic_write_text(done, json.dumps({"version": WORLD_VERSION, "files": files}, indent=1))
    return {k: world_dir / name for k, name in json.loads(done.read_text())["files"].items()}


def heldout_items(path):
    """World held-out prompts (question, image, ground truth), images relative to the file."""
    path = Path(path)
    items = data.read_rows(path)
    for i, it in enumerate(items):
        need = ("question", "kind", "query", "truth") + (("objects",) if isinstance(it, dict) and "image" in it else ())
        if not isinstance(it, dict) or not all(k in it for k in need):
            raise ValueError(f"{path} row {i + 1}: expected a world held-out prompt with {need} (the question and the "
                             f"ground truth the world's checker reads)")
    return [dict(it, _dir=str(path.parent)) for it in items]


def eval_policy(model, items, hd_num=9, batch=64, max_new_tokens=48):
    """Greedy held-out accuracy of a policy on world items, overall and per question kind (world checker)."""
    model.eval()
    correct, by_kind = [], {}
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        prompts = [(it["question"], [str(Path(it["_dir"]) / it["image"])] if "image" in it else []) for it in chunk]
        for it, ans in zip(chunk, model.answer(prompts, hd_num, max_new_tokens)):
            ok = is_correct(it, ans)
            correct.append(ok)
            by_kind.setdefault(it["kind"], []).append(ok)
    return sum(correct) / len(correct), {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
