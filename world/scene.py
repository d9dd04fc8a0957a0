"""The world itself: layouts of coloured shapes, their images, the questions asked about them (with instructions
and follow-ups, as real instruction data asks), and answers written as sentences. Everything here is drawn from a
numpy Generator, so the same seed writes the same world.

Real instruction data asks for a form or a scope as well as for content (MIA-Bench, IFEval); RLHF gains where
judging is easier than doing, and a reward model judges a form or a scope from the text alone, while checking a
stated colour needs the image. Each instruction has a strict programmatic check (checker.follows), apart from
content (checker.is_correct). Multi-turn follow-ups (MM-MT-Bench, MIA-Bench's multi-turn items): the last turn of a
two-turn conversation either asks again in another form or scope ("Now answer in one word.") or asks a new question
about the same image; the earlier turn's answer is the reference one.
"""
import json
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw

from world import CELL, COLOURS, GRID, IMG, SHAPES, quadrant
from world.checker import CONFUSED, WORD_RE, failure_kind

MARGIN = 3                   # white pixels around each object inside its cell
# Weights tuned with the weaker model's slips (checker.perception_slip) so ~20% of SFT answers state a wrong value;
# describe, which the scope instructions apply to, is a fifth of the image questions.
IMAGE_KINDS = {"colour": 0.22, "count": 0.22, "presence": 0.2, "position": 0.16, "describe": 0.2}
TEXT_KINDS = {"arith": 0.5, "compare": 0.5}
IMAGE_SHARE = 2 / 3          # official reward mix: 2 image samples : 1 text sample (preference and held-out sets)
HELDOUT_MOD = 10             # image layouts with crc32 % 10 == 0 exist only in held-out splits
ARITH_MAX, COMPARE_MAX = 9, 20

INSTRUCTION_SHARE = 0.5      # of held-out and preference items whose kind takes an instruction (SFT: store's)
PREFACE = "Look at the picture. "   # a harmless opening the weaker model answers by refusing (weaker.weaker_answer)
PREFACE_SHARE = 0.12         # of image questions
FOLLOWUP_SHARE = 0.2         # of held-out, preference and SFT items
MAX_WORDS, MIN_WORDS = 5, 10
INSTRUCTIONS = {             # id -> question kinds it applies to
    "one_word": ("colour", "presence"), "number_only": ("count", "arith"),
    "key_value": ("colour", "count", "position"), "max_words": ("count", "presence", "position"),
    "min_words": ("count", "presence", "position"), "one_per_line": ("describe",),
    "only_colour": ("describe",), "only_half": ("describe",), "left_to_right": ("describe",)}
SCOPES = ("only_colour", "only_half", "left_to_right")
# Chosen by weight among those that apply. Ignoring most instructions makes an answer longer; ignoring min_words,
# one object per line or an order does not, and these weigh more, so that length predicts less of the preference.
INSTRUCTION_WEIGHT = {"min_words": 3.0, "number_only": 0.5, "one_per_line": 1.0, "left_to_right": 3.0,
                      "only_colour": 3.0, "only_half": 3.0}
KEY = {"colour": "colour", "count": "count", "position": "position"}
CLAUSE = {"image": "I checked the whole image carefully.", "text": "I checked this carefully."}


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


def save_image(item, out_dir):
    """Draw an image item's picture to out_dir/images/<id>.png, once, and name it in the item."""
    if "objects" in item and "image" not in item:
        item["image"] = f"images/{item['id']}.png"
        draw(item["objects"]).save(os.path.join(out_dir, item["image"]), compress_level=1)  # 1/3 faster than 6
    return item


def cell_labels(objects):
    """Per cell, row-major: the colour and the shape drawn there as 1-based indices into COLOURS and SHAPES, 0 where
    the cell is empty (the targets of build.pretrain_vision)."""
    colour, shape = [0] * GRID * GRID, [0] * GRID * GRID
    for c, s, row, col in objects:
        colour[row * GRID + col], shape[row * GRID + col] = 1 + list(COLOURS).index(c), 1 + SHAPES.index(s)
    return colour, shape


def cell_tokens(tokens):
    """One world image's projected tokens (InternLMXComposer2.encode_images, one crop) -> [GRID * GRID, D], one
    merged token per cell, row-major as cell_labels: the local crop comes last, GRID rows of GRID cell tokens, each
    row closed by sub_GN."""
    return tokens[-GRID * (GRID + 1):].reshape(GRID, GRID + 1, -1)[:, :GRID].reshape(GRID * GRID, -1)


def pick(rng, weights):
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
            # twin of a present object, where the absent_object slip fires.
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
    k = kind or pick(rng, IMAGE_KINDS if image else TEXT_KINDS)
    while True:
        objs = sample_objects(rng, max_objects, heldout) if image else None
        qa = _question(rng, k, objs)
        if qa:
            plain = {"kind": k, "question": qa[0], "query": qa[1], "truth": qa[2],
                     **({"objects": objs} if image else {})}
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
