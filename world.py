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
import functools
import gzip
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
# shipped: a deeper trunk trained on right answers only, for a reward model that judges perception better than the
# policy produces it (train.py --stage rm --init WORLD_JUDGE; it shares WORLD_SFT's tokenizer, as PPO requires)
WORLD_JUDGE = ROOT / "checkpoints" / "world-judge"
# the tiny model of the built-in world: 112-px crops (4x4 merged tokens per view), a few narrow layers
WORLD_CONFIG = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, plora_rank=16, max_position_embeddings=4096, max_length=512,
                    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=112, patch_size=14))

WORLD_VERSION = 8            # ensure_world rewrites a cached world written by another version
IMG, CELL, GRID, MARGIN = 112, 28, 4, 3
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
# Weights tuned with the error rules (systematic_error) so ~20% of SFT answers state a wrong value; describe,
# which the scope instructions apply to, is a fifth of the image questions.
IMAGE_KINDS = {"colour": 0.22, "count": 0.22, "presence": 0.2, "position": 0.16, "describe": 0.2}
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
PAIR_MINUTES = 13            # sampling the preference pairs' answers: 11200 prompts x 4, on 2 cores
PAIRS_FILE = "pairs.json.gz"  # beside the SFT policy: the pairs its samples made (ship_pairs)
MAX_LEN_RATIO = 2.5          # train.py's default --max-len-ratio (the paper's length constraint)
GT_KEYS = ("kind", "query", "truth", "objects", "instruction", "history")   # ground truth kept in every row for is_correct
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


def cell_labels(objects):
    """Per cell, row-major: the colour and the shape drawn there as 1-based indices into COLOURS and SHAPES, 0 where
    the cell is empty (the targets of train.py's pretrain_vision)."""
    colour, shape = [0] * GRID * GRID, [0] * GRID * GRID
    for c, s, row, col in objects:
        colour[row * GRID + col], shape[row * GRID + col] = 1 + list(COLOURS).index(c), 1 + SHAPES.index(s)
    return colour, shape


def cell_tokens(tokens):
    """One world image's projected tokens (InternLMXComposer2.encode_images, one crop) -> [GRID * GRID, D], one
    merged token per cell, row-major as cell_labels: the local crop comes last, GRID rows of GRID cell tokens, each
    row closed by sub_GN."""
    return tokens[-GRID * (GRID + 1):].reshape(GRID, GRID + 1, -1)[:, :GRID].reshape(GRID * GRID, -1)


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


def make_item(rng, max_objects=4, heldout=False, kind=None, image_share=IMAGE_SHARE, instruction_share=0.0,
              preface_share=0.0, followup_share=0.0):
    """One question with ground truth; `max_objects` is the curriculum knob (1 = single object). With
    `instruction_share` it may carry an instruction, with `preface_share` (image questions) the PREFACE, with
    `followup_share` it may be the second turn of a conversation (see _follow_up)."""
    image = kind in IMAGE_KINDS if kind else rng.random() < image_share
    k = kind or _pick(rng, IMAGE_KINDS if image else TEXT_KINDS)
    while True:
        objs = sample_objects(rng, max_objects, heldout) if image else None
        qa = _question(rng, k, objs)
        if qa:
            plain = {"kind": k, "question": qa[0], "query": qa[1], "truth": qa[2], **({"objects": objs} if image else {})}
            item = _instruct(rng, plain, instruction_share)
            if followup_share and rng.random() < followup_share and (out := _follow_up(rng, plain, item)):
                return out
            if image and rng.random() < preface_share:
                item["question"] = PREFACE + item["question"]
            return item


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


# ----------------------------------------------------------------------------------------------------------------
# Instructions. Real instruction data asks for a form or a scope as well as for content
# (MIA-Bench, IFEval); RLHF gains where judging is easier than doing, and a reward model judges a form or a scope
# from the text alone, while checking a stated colour needs the image. Each instruction has a strict programmatic
# checker (`follows`, IFEval's strict mode), apart from content correctness (`is_correct`).

INSTRUCTION_SHARE = 0.5      # of held-out and preference items whose kind takes an instruction (SFT: 0.4)
SFT_INSTRUCTION_SHARE = 0.4
PREFACE = "Look at the picture. "   # a harmless opening the weaker model answers by refusing (see weaker_answer)
PREFACE_SHARE = 0.12         # of image questions
MAX_WORDS, MIN_WORDS = 5, 10
INSTRUCTIONS = {             # id -> question kinds it applies to
    "one_word": ("colour", "presence"), "number_only": ("count", "arith"),
    "key_value": ("colour", "count", "position"), "max_words": ("count", "presence", "position"),
    "min_words": ("count", "presence", "position"), "one_per_line": ("describe",),
    "only_colour": ("describe",), "only_half": ("describe",), "left_to_right": ("describe",)}
SCOPES = ("only_colour", "only_half", "left_to_right")
# Chosen by weight among those that apply. Ignoring most instructions makes an answer longer; ignoring min_words,
# one object per line or an order does not, and these weigh more, so that length predicts less of the preference.
INSTRUCTION_WEIGHT = {"min_words": 3.0, "number_only": 0.5, "one_per_line": 1.0, "left_to_right": 3.0, "only_colour": 3.0, "only_half": 3.0}
# What an ignored instruction looks like: its failure kind. The weaker model (weaker_answer) ignores all but
# one_word, which it follows in a first turn: a control the policy gets right before RLHF (in a follow-up it repeats
# its earlier answer, whatever the instruction).
IGNORED = {"one_word": "ignored_format", "number_only": "ignored_format", "key_value": "ignored_format",
           "min_words": "ignored_format", "one_per_line": "ignored_format", "max_words": "extra_clause",
           "only_colour": "ignored_scope", "only_half": "ignored_scope", "left_to_right": "ignored_scope"}
SFT_IGNORES = tuple(i for i in INSTRUCTIONS if i != "one_word")
FAMILY = {"ignored_format": "instruction", "extra_clause": "instruction", "ignored_scope": "instruction",
          "refusal": "instruction", "repeated_answer": "instruction", **{k: "perception" for k in ERROR_KINDS}}
KEY = {"colour": "colour", "count": "count", "position": "position"}


def pair_family(row):
    """The family a preference pair is reported under: its failure's, except that a content failure on a follow-up
    is "followup": the earlier turn may state the value ("The square is blue." before "Now answer in one word."),
    so the text alone can tell, and the pair must not pass for one that needs the image."""
    family = failure_family(row["kind"], row.get("question_kind"))
    return "followup" if row.get("history") and family != "instruction" else family


def failure_family(kind, question_kind=None):
    """instruction (form, scope, refusal), perception (a wrong value about the image) or text (arithmetic)."""
    if kind in FAMILY:
        return FAMILY[kind]
    return "perception" if question_kind in IMAGE_KINDS else "text"


def _instruct(rng, item, share):
    """Give `item` one instruction (with probability `share`, when its kind takes one): the question says it and
    the ground truth follows its scope. Returns the item unchanged when the image cannot support the choice."""
    ids = [i for i, kinds in INSTRUCTIONS.items() if item["kind"] in kinds]
    if not ids or rng.random() >= share:
        return item
    weights = np.array([INSTRUCTION_WEIGHT.get(i, 1.0) for i in ids])
    for iid in rng.choice(ids, size=len(ids), replace=False, p=weights / weights.sum()):
        if (out := _instructed(rng, item, str(iid))) is not None:
            return out
    return item


def _instructed(rng, item, iid):
    """`item` with instruction `iid`, or None when its image cannot support it (a scope that selects nothing or
    everything, one object per line for a single object, an order that is already left to right)."""
    inst, q = {"id": iid}, item["question"]
    objs = [[c, s, quadrant(r, col)] for c, s, r, col in item.get("objects") or []]
    if iid == "one_word":
        q += " Answer in one word."
    elif iid == "number_only":
        q += " Answer with a number only."
    elif iid == "key_value":
        inst["key"] = KEY[item["kind"]]
        q += f' Answer in the form "{inst["key"]}: ...".'
    elif iid in ("max_words", "min_words"):
        inst["n"] = MAX_WORDS if iid == "max_words" else MIN_WORDS
        q += f" Answer in at {'most' if iid == 'max_words' else 'least'} {inst['n']} words."
    elif iid == "one_per_line":
        if len(objs) < 2:
            return None
        q += " List one object per line."
    elif iid == "only_colour":
        scoped = [c for c in COLOURS if 0 < sum(o[0] == c for o in objs) < len(objs)]
        if not scoped:
            return None
        inst["colour"] = scoped[int(rng.integers(len(scoped)))]
        q = f"Describe only the {inst['colour']} objects."
    elif iid == "only_half":
        halves = [h for h in ("top", "bottom") if 0 < sum(o[2].startswith(h) for o in objs) < len(objs)]
        if not halves:
            return None
        inst["half"] = halves[int(rng.integers(len(halves)))]
        q = f"Describe only the {inst['half']} half of the image."
    else:  # left_to_right: only where the usual row-major order is not already left to right
        if _left_to_right(objs) == objs:
            return None
        q = "Describe the objects from left to right."
    return dict(item, question=q, instruction=inst, truth=_scoped(inst, objs) if item["kind"] == "describe"
                else item["truth"])


def _left_to_right(objs):
    return sorted(objs, key=lambda o: o[2].endswith("right"))   # stable: row-major within each half


def _scoped(inst, objs):
    """The objects a describe answer must name under the instruction, in the order it asks for."""
    if inst["id"] == "only_colour":
        return [o for o in objs if o[0] == inst["colour"]]
    if inst["id"] == "only_half":
        return [o for o in objs if o[2].startswith(inst["half"])]
    return _left_to_right(objs) if inst["id"] == "left_to_right" else objs


# Multi-turn follow-ups (MM-MT-Bench, MIA-Bench's multi-turn items): the last turn of a two-turn conversation
# either asks again in another form or scope ("Now answer in one word.") or asks a new question about the same
# image. The earlier turn's answer is the reference one. The weaker model repeats its earlier answer
# (repeated_answer), a failure the reward model can see in the text alone.
FOLLOWUP_SHARE = 0.2         # of held-out and preference items (SFT: the same)


def _follow_up(rng, plain, item):
    """`item` as the second turn after a question about the same image (a text item: after the other text kind): a
    form or scope follow-up when `item` carries an instruction ("Now " + the instruction, the first turn the plain
    question), else a new question after another question. None when the image supports no other question, or when
    the earlier answer already answers the follow-up."""
    inst = item.get("instruction")
    if inst:
        said = item["question"][len(plain["question"]):].strip() if item["question"].startswith(plain["question"]) \
            else item["question"]
        first = plain
        question = f"Now {said[0].lower()}{said[1:]}"
    else:
        kinds = [str(k) for k in (IMAGE_KINDS if "objects" in plain else TEXT_KINDS) if k != plain["kind"]]
        asked = ((k, _question(rng, k, plain.get("objects"))) for k in rng.permutation(kinds))
        k, qa = next(((k, qa) for k, qa in asked if qa), (None, None))
        if qa is None:
            return None
        first, question = dict(plain, kind=k, question=qa[0], query=qa[1], truth=qa[2]), item["question"]
    out = dict(item, question=question, history=[[first["question"], render(first, first["truth"])]])
    return out if failure_kind(out, out["history"][0][1]) else None   # "Now in at most 5 words" after 5 words


def prompt(item, image_dir):
    """(question, images, history): what model.answer takes for this item."""
    return (item["question"], [os.path.join(image_dir, item["image"])] if "image" in item else [],
            item.get("history", ()))


def turns(item, answer_text, user="user", assistant="assistant"):
    """The item's conversation ending in `answer_text`, in the official rows' {"from", "value"} form."""
    said = [m for q, a in item.get("history", ()) for m in ((user, q), (assistant, a))]
    return [{"from": r, "value": v} for r, v in said + [(user, item["question"]), (assistant, answer_text)]]


def short(item, value):
    """The bare value as a one- or two-word answer."""
    if item["kind"] == "position":
        return f"{value[0].upper()}{value[1:]}."
    return f"{str(value)[0].upper()}{str(value)[1:]}."


def answer(item, value):
    """The answer stating `value` that follows the item's instruction (the plain sentence when it has none)."""
    inst = item.get("instruction")
    if not inst:
        return render(item, value)
    iid = inst["id"]
    if iid == "one_word":
        return short(item, value)
    if iid == "number_only":
        return str(value)
    if iid == "key_value":
        return f"{inst['key']}: {value}"
    if iid == "max_words":
        plain = render(item, value)
        return plain if len(WORD_RE.findall(plain)) <= inst["n"] else short(item, value)
    if iid == "min_words":
        return f"{render(item, value)} It is easy to see."   # a short filler: within the paper's length filter
    if iid == "one_per_line":
        return "\n".join(f"A {c} {s} in the {p}." for c, s, p in value)
    return render(item, value)   # scopes: `value` is already the scoped, ordered list


def ignored(item, value):
    """The answer stating `value` as the weaker model writes it when it ignores the item's instruction: the plain
    sentence (all objects, row-major, for a scope), or with an unrequested clause where words are limited."""
    inst = item["instruction"]
    if inst["id"] in SCOPES:
        return render(item, [[c, s, quadrant(r, col)] for c, s, r, col in item["objects"]])
    if inst["id"] == "max_words":
        return f"{render(item, value)} {CLAUSE['image']}"
    return render(item, value)


WORD_RE = re.compile(r"\w+")


def follows(item, answer_text):
    """Strict instruction following (IFEval's strict mode: the raw answer, no clean-up) of the item's one
    instruction; None when it has none. An empty answer or a refusal follows nothing."""
    inst = item.get("instruction")
    if not inst:
        return None
    a = (answer_text or "").strip()
    if not a or any(m in a.lower() for m in REFUSAL_MARKERS):
        return False
    iid, words = inst["id"], WORD_RE.findall(a)
    if iid == "one_word":
        return len(words) == 1
    if iid == "number_only":
        return re.fullmatch(r"\d+\.?", a) is not None
    if iid == "key_value":
        return re.fullmatch(rf"{inst['key']}: [^\n]+", a, re.IGNORECASE) is not None
    if iid == "max_words":
        return len(words) <= inst["n"]
    if iid == "min_words":
        return len(words) >= inst["n"]
    if iid == "one_per_line":
        lines = [line for line in a.split("\n") if line.strip()]
        return len(lines) > 1 and all(len(re.findall(COLOUR_RE, line.lower())) == 1 for line in lines)
    found = _mentioned(a.lower())
    if iid == "only_colour":
        return bool(found) and set(re.findall(COLOUR_RE, a.lower())) == {inst["colour"]}
    if iid == "only_half":
        return bool(found) and all(p.startswith(inst["half"]) for _, _, p in found) and \
            len(re.findall(COLOUR_RE, a.lower())) == len(found)
    sides = [p.endswith("right") for _, _, p in found]   # left_to_right
    return len(found) > 1 and sides == sorted(sides)


def failure_kind(item, answer_text):
    """What is wrong with an answer, by the world's checker: None when it is right (correct and following its
    instruction), else refusal, repeated_answer (a follow-up answered with the earlier turn's answer), the item's
    ignored-instruction kind (not for a scoped description that names the scope's places with a wrong attribute),
    the item's systematic error kind when the answer states that error, or wrong_value."""
    a = (answer_text or "").strip().lower()
    if not a or any(m in a for m in REFUSAL_MARKERS):
        return "refusal"
    item = dict(item, kind=item.get("question_kind", item["kind"]))   # a preference row keeps it there
    followed, correct = follows(item, answer_text) is not False, is_correct(item, answer_text)
    if followed and correct:
        return None
    if item.get("history") and WORD_RE.findall(a) == WORD_RE.findall(item["history"][-1][1].lower()):
        return "repeated_answer"
    # A colour scope answered with exactly the scope's places but a wrong colour ("only the blue objects" -> "a green
    # circle in the top left", where the blue circle is) fails `follows` strictly, yet what is wrong is perception
    kept = (item.get("instruction") or {}).get("id") in ("only_colour", "only_half") and \
        sorted(p for _, _, p in _mentioned(a)) == sorted(o[2] for o in item["truth"])
    if not followed and not kept:
        return IGNORED[item["instruction"]["id"]]
    err = systematic_error(item)
    return err[0] if err and is_correct(dict(item, truth=err[1]), answer_text) else "wrong_value"


def systematic_error(item):
    """(error kind, wrong value) a weaker model would produce for this item, or None.
    Deterministic in the input so a policy fitted on it reproduces it under greedy decoding."""
    k, q, t = item["kind"], item["query"], item["truth"]
    if k == "count" and t >= 2:
        return "overcount", t + 1
    if k == "colour" and t in CONFUSED:
        return "colour_confusion", CONFUSED[t]
    if k == "presence" and t == "no" and [CONFUSED.get(q["colour"]), q["shape"]] in [o[:2] for o in item["objects"]]:
        # names an absent object whose twin of the other cool hue is there: only then, so that the SFT data still
        # teaches colour-shape binding on every other hard negative
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


DESCRIBE_RE = rf"{COLOUR_RE} {SHAPE_RE} (?:is )?(?:in|at) the (top|bottom) (left|right)\b"


def _mentioned(a):
    """[colour, shape, quadrant] of each object a (lower-case) description names, in order."""
    return [[c, s, f"{v} {h}"] for c, s, v, h in re.findall(DESCRIBE_RE, a)]


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
        # every object named is in the image and every object asked for is named (a scope asks for some); each
        # colour word belongs to a named object, and a stated count is the number named
        found = _mentioned(a)
        said = collections.Counter(map(json.dumps, found))
        image = collections.Counter(json.dumps([c, s, quadrant(r, col)]) for c, s, r, col in item["objects"])
        return (bool(found) and not said - image and not collections.Counter(map(json.dumps, t)) - said
                and len(re.findall(COLOUR_RE, a)) == len(found) and set(_numbers(a)) <= {len(found)})
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


INSTRUCTION_PREF_KINDS = {"ignored": 0.55, "wrong_value": 0.35, "refusal": 0.10}   # pairs on instruction items
REPEAT_PREF_SHARE = 0.4      # of the synthetic pairs on follow-ups: the rejected side repeats the earlier answer


def make_instruction_pair(rng, item, allowed=lambda wrong: True, rkind=None):
    """make_pair for an item that carries an instruction: both sides in the instruction's form (no styling, which
    would break it), the rejected one ignoring the instruction ("ignored": the item's IGNORED kind), stating a
    wrong value, refusing, or (a follow-up) repeating the earlier answer. None when no draw passes `allowed` or the
    paper's length filter."""
    rkind = rkind or _pick(rng, INSTRUCTION_PREF_KINDS)
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
    rkind = rkind or _pick(rng, PREF_KINDS)
    good = render(item, item["truth"])
    wrong = None
    if rkind not in ("refusal", "repeated_answer"):
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
        elif rkind == "repeated_answer":
            chosen, rejected = _styled(good, mod, _pick(rng, CHOSEN_STYLE)), item["history"][-1][1]
        else:
            chosen = _styled(good, mod, _pick(rng, CHOSEN_STYLE))
            rejected = _styled(render(item, wrong), mod, _pick(rng, REJECTED_STYLE))
        if len(chosen) <= MAX_LEN_RATIO * len(rejected):
            return chosen, rejected, rkind, wrong
    if rkind == "repeated_answer":   # a short earlier answer before a long one: this item cannot carry the kind
        return None
    raise RuntimeError(f"cannot phrase a pair within the length ratio for {item}")


def _items(rng, n, out_dir, prefix, max_objects=4, heldout=False, image_share=IMAGE_SHARE,
           instruction_share=INSTRUCTION_SHARE, followup_share=FOLLOWUP_SHARE):
    return [_save_image(dict(make_item(rng, max_objects, heldout, image_share=image_share,
                                       instruction_share=instruction_share, preface_share=PREFACE_SHARE,
                                       followup_share=followup_share),
                             id=f"{prefix}_{i:05d}"), out_dir) for i in range(n)]


def _save_image(item, out_dir):
    if "objects" in item and "image" not in item:
        item["image"] = f"images/{item['id']}.png"
        draw(item["objects"]).save(os.path.join(out_dir, item["image"]), compress_level=1)  # 1/3 faster than 6
    return item


def weaker_answer(rng, item, error_rate):
    """(answer, failure kinds) as the weaker model that wrote the SFT set answers: each of its rules fires on its
    cases with probability `error_rate`, so the failure is the SFT policy's greedy choice while the right answer
    stays in its distribution. Perception: systematic_error. Instruction: refusing a question that opens with
    PREFACE, repeating its earlier answer to a follow-up, and ignoring every instruction but one_word (IGNORED names
    how)."""
    kinds, value = [], item["truth"]
    err = systematic_error(item)
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


def _sft(rng, items, error_rate):
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


BALANCED_KINDS = ("colour", "count", "presence", "position")


VALUES = {"colour": list(COLOURS), "count": list(range(8)), "presence": ["yes", "no"],
          "position": [quadrant(r, c) for r in (0, 3) for c in (0, 3)]}   # what a one-value answer can state


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


def _pref(rng, item_rng, n, out_dir, prefix, heldout=False, policy=None, k=4, block=64):
    """n preference pairs. With a `policy`, built as the paper builds them (policy_pair: k samples per prompt
    graded by the checker); where every sample is right, or without a policy, drawn by make_pair /
    make_instruction_pair. In both, the question and the two values never tell, without the image, which side is
    right: for the image kinds, (query, truth a, wrong b) is accepted only while it is not more frequent than
    (query, truth b, wrong a): the systematic errors alone would make "the larger count is wrong" true for most
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
            items.append(_save_image(dict(new_item(), id=f"{prefix}_{drawn:05d}"), out_dir)
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
                source, rkind = "synthetic", _pick(rng, INSTRUCTION_PREF_KINDS if instructed else PREF_KINDS)
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
            it = _save_image(it, out_dir)
            row = {"id": it["id"], **({"image": it["image"]} if "image" in it else {})}
            row["conversations_a"] = turns(it, good, "human", "bot")
            row["conversations_b"] = turns(it, bad, "human", "bot")
            gt = {name: it[name] for name in GT_KEYS if name in it}
            gt["question_kind"] = gt.pop("kind")    # "kind" of a pair row is the rejected kind
            row = dict(row, **gt, kind=rkind, source=source)
            rows.append(dict(row, family=pair_family(row)))
    return rows


NOISE_KINDS = {"other_image": 0.2, "refusal": 0.2, "hallucination": 0.2, "ignored_instruction": 0.2,
               "wrong_value": 0.2}
NOISE_SHARE = 0.3            # of the cleaning set's rows


def noisy_answer(rng, item, others):
    """(answer, noise kind) for a noisy row of the cleaning set, the kinds the paper's cleaning found (Fig. 2):
    an answer that belongs to another image (the right answer to the same question about another image), a
    refusal, a hallucinated object (a description naming one more object than there is), an ignored instruction,
    a wrong value. None when this item cannot carry the kind drawn."""
    kind = "hallucination" if item["kind"] == "describe" and rng.random() < 0.5 else _pick(rng, NOISE_KINDS)
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


def _clean_set(rng, items):
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


def write_world(out_dir, seed=0, n_sft=40000, n_pref=10000, n_heldout=300, n_sft_easy=2000,
                error_rate=0.7, n_pref_heldout=None, policy=None, n_clean=None, pairs=None):
    """Write every world file under out_dir; returns {name: path}. Deterministic by seed. The preference pairs are
    sampled from `policy` (see _pref), or are `pairs` ({"pref_train": rows, "pref_heldout": rows}, as shipped beside
    the SFT policy that sampled them; their images are drawn from their rows).
    sft_easy.json holds single-object images for an SFT curriculum warm-up. `error_rate` < 1 keeps the right
    answer in the SFT policy's distribution (greedy still picks the error), so sampling can find it: best-of-N
    and PPO need that, as they do with real models. The held-out preference pairs default to 4 x n_heldout (1200):
    with 300, the reward model's accuracy had a standard error of 0.023, too coarse to rank two recipes."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    n_clean = 2 * n_heldout if n_clean is None else n_clean
    rng = [np.random.default_rng([seed, s]) for s in range(8)]
    sft, errs = _sft(rng[5], _items(rng[0], n_sft, out_dir, "sft", image_share=SFT_IMAGE_SHARE,
                                    instruction_share=SFT_INSTRUCTION_SHARE), error_rate)
    easy, easy_errs = _sft(rng[5], _items(rng[1], n_sft_easy, out_dir, "easy", max_objects=1,
                                          image_share=SFT_IMAGE_SHARE, instruction_share=0.0, followup_share=0.0),
                            error_rate)
    held = _heldout_prompts(rng[4], n_heldout, out_dir, "heldout")
    clean = _clean_set(np.random.default_rng([seed, 9]), _items(np.random.default_rng([seed, 8]), n_clean, out_dir,
                                                                 "clean", heldout=True))
    files = {"sft_train": sft, "sft_easy": easy, "sft_errors": errs + easy_errs,
             "pref_train": pairs["pref_train"] if pairs else _pref(rng[6], rng[2], n_pref, out_dir, "pref",
                                                                   policy=policy),
             "pref_heldout": pairs["pref_heldout"] if pairs else _pref(rng[7], rng[3], n_pref_heldout or 4 * n_heldout,
                                                                       out_dir, "prefheld", heldout=True, policy=policy),
             "heldout_prompts": held,
             "clean_set": clean}
    for row in (pairs["pref_train"] + pairs["pref_heldout"] if pairs else []):
        if "image" in row:
            draw(row["objects"]).save(os.path.join(out_dir, row["image"]), compress_level=1)
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
        convs = [r[key] for key in ("conversations", "conversations_a", "conversations_b") if key in r]
        if "question" in r:   # a held-out prompt with its reference answer
            convs.append(turns(r, r["answer"]))
        out += ["".join(f"[UNUSED_TOKEN_146]{role.get(m['from'], 'assistant')}\n{m['value']}[UNUSED_TOKEN_145]\n"
                        for m in conv) for conv in convs]
    return out


def train_world_tokenizer(texts, model_path, vocab_size=800):
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


def policy_id(path=WORLD_SFT):
    """The shipped SFT policy's identity: a world's preference pairs are its samples, so a new policy makes the
    cached pairs stale."""
    weights = Path(path) / "model.safetensors"
    return f"{Path(path).name}:{zlib.crc32(weights.read_bytes()):08x}" if weights.is_file() else None


def ship_pairs(world_dir=WORLD_DIR, policy_dir=WORLD_SFT):
    """Store a world's preference pairs beside the SFT policy that sampled them (PAIRS_FILE, gzip JSON), so that a
    fresh clone writes the world in a minute instead of sampling for PAIR_MINUTES."""
    world_dir = Path(world_dir)
    meta = json.loads((world_dir / "world.json").read_text())
    if meta.get("pairs_policy") != policy_id(policy_dir):
        raise ValueError(f"{world_dir}'s pairs were not sampled from {policy_dir} ({meta.get('pairs_policy')} != "
                         f"{policy_id(policy_dir)})")
    rows = {k: json.loads((world_dir / meta["files"][k]).read_text()) for k in ("pref_train", "pref_heldout")}
    blob = gzip.compress(json.dumps({"version": WORLD_VERSION, "policy": meta["pairs_policy"], **rows}).encode(),
                         mtime=0)
    data.atomic_write_bytes(Path(policy_dir) / PAIRS_FILE, blob)


def shipped_pairs(policy_dir):
    """The pairs shipped beside the policy, when they are this world version's and this policy's; else None."""
    path = Path(policy_dir) / PAIRS_FILE
    if not path.is_file():
        return None
    pairs = json.loads(gzip.decompress(path.read_bytes()))
    return pairs if (pairs.get("version"), pairs.get("policy")) == (WORLD_VERSION, policy_id(policy_dir)) else None


def ensure_world(world_dir=WORLD_DIR, policy_dir=WORLD_SFT):
    """Write the built-in world once (deterministic by seed; the preference pairs are the shipped SFT policy's
    samples, read from PAIRS_FILE beside it or sampled anew, about PAIR_MINUTES on 2 cores) and return its file
    paths. Every torchrun rank calls this: a lock file lets one write while the others wait, then read. A cache
    written by another world version, or whose pairs came from another policy, is rewritten; one that names no
    policy (written by write_world alone, as the tests do) is used as it is."""
    world_dir = Path(world_dir)
    done = world_dir / "world.json"

    def current():
        if not done.is_file():
            return False
        meta = json.loads(done.read_text())
        return meta.get("version") == WORLD_VERSION and meta.get("pairs_policy", policy_id(policy_dir)) == \
            policy_id(policy_dir)

    if not current():  # a complete cache is only read, so it may sit on a read-only disk
        world_dir.mkdir(parents=True, exist_ok=True)
        with open(world_dir / ".lock", "w") as lock:
            if fcntl:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not current():
                pairs, policy = shipped_pairs(policy_dir), None
                if pairs is None and policy_id(policy_dir):
                    from model import InternLMXComposer2   # the one place the world runs a model
                    policy = InternLMXComposer2.from_pretrained(policy_dir)
                print(f"writing the built-in world (version {WORLD_VERSION}) to {world_dir}: images, data files and "
                      f"tokenizer, about a minute" + (f", and the SFT policy's samples for the preference pairs, "
                      f"about {PAIR_MINUTES} minutes more" if policy else "") + ", once", file=sys.stderr, flush=True)
                paths = write_world(str(world_dir), seed=0, policy=policy, pairs=pairs)
                rows = sum((json.loads(Path(p).read_text()) for p in paths.values()), [])
                train_world_tokenizer(template_texts(rows), str(world_dir / "tokenizer.model"))
                files = {k: Path(p).name for k, p in paths.items()}
                meta = {"version": WORLD_VERSION, "files": files, "pairs_policy": policy_id(policy_dir)}
                data.atomic_write_text(done, json.dumps(meta, indent=1))
    return {k: world_dir / name for k, name in json.loads(done.read_text())["files"].items()}


def write_heldout(out_dir, n, seed):
    """n more held-out prompts (held-out layouts), from a stream no world file draws from ([0, 10, seed]; the world's
    files use [0, 0..9]), written with their images to out_dir/heldout_prompts.json; returns that path. The world's
    300 held-out prompts hold a failure kind the policy makes rarely on a handful of prompts: more prompts, not more
    samples of the same ones, make its figures trustworthy."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = Path(out_dir) / "heldout_prompts.json"
    held = _heldout_prompts(np.random.default_rng([0, 10, seed]), n, out_dir, "fresh")
    data.atomic_write_text(path, json.dumps(held, indent=1))
    return path


def _heldout_prompts(rng, n, out_dir, prefix):
    """n questions on held-out layouts, each with its reference answer."""
    return [dict(it, answer=answer(it, it["truth"])) for it in _items(rng, n, out_dir, prefix, heldout=True)]


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


def content_family(item):
    """Where an item's content accuracy is reported: followup (a second turn: the earlier turn may state its value,
    and a new question answered by repeating the earlier answer is wrong in content, which would pass for a
    perception or arithmetic error), else perception (an image question) or text."""
    return "followup" if item.get("history") else "perception" if item.get("objects") else "text"


def judge(items, answers):
    """The world's checker over answers to `items`: content accuracy (is_correct) overall, per question kind and per
    content_family (perception: the first-turn image questions; text; followup), strict instruction following
    (follows) over the items that carry an instruction, overall and per instruction, the share of follow-ups (second
    turns) answered right, and the share of items with each failure kind (failure_kind, which names an instruction
    failure before a content one) and family (pair_family's, so that a follow-up's wrong value is not counted as
    perception here while its pairs and its content accuracy report it apart)."""
    by_kind, by_family, by_inst, fails, families = {}, {}, {}, collections.Counter(), collections.Counter()
    followups = []
    for it, ans in zip(items, answers):
        ok = is_correct(it, ans)
        by_kind.setdefault(it["kind"], []).append(ok)
        by_family.setdefault(content_family(it), []).append(ok)
        if it.get("instruction"):
            by_inst.setdefault(it["instruction"]["id"], []).append(bool(follows(it, ans)))
        f = failure_kind(it, ans)
        if it.get("history"):
            followups.append(f is None)
        if f is not None:
            fails[f] += 1
            families[pair_family({"kind": f, "question_kind": it["kind"], "history": it.get("history")})] += 1
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    followed = sum(by_inst.values(), [])
    return {"accuracy": mean(sum(by_kind.values(), [])),
            "accuracy_by_kind": {k: mean(v) for k, v in sorted(by_kind.items())},
            "accuracy_by_family": {k: mean(v) for k, v in sorted(by_family.items())},
            "instruction_following": mean(followed) if followed else None,
            "instruction_following_by_id": {k: mean(v) for k, v in sorted(by_inst.items())},
            "right": 1 - sum(fails.values()) / max(len(items), 1),
            "followup_right": mean(followups) if followups else None,
            "failures_by_kind": {k: n / len(items) for k, n in sorted(fails.items())},
            "failures_by_family": {k: n / len(items) for k, n in sorted(families.items())}}


def eval_policy(model, items, hd_num=9, batch=64, max_new_tokens=48):
    """A policy's greedy answers to world held-out items, judged (see judge)."""
    model.eval()
    answers = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        answers += model.answer([prompt(it, it["_dir"]) for it in chunk], hd_num, max_new_tokens)
    return judge(items, answers)


def tagged(result, tag):
    """judge()'s keys with `tag` after the metric's name: accuracy_by_kind -> accuracy_<tag>_by_kind."""
    return {k.replace("_by_", f"_{tag}_by_") if "_by_" in k else f"{k}_{tag}": v for k, v in result.items()}
