"""Tokenizer, prompt templates, data readers and batching for IXC-2.5 / IXC-2.5-Reward (no nn.Module here).

The tokenizer reproduces the official slow `InternLM2Tokenizer` under transformers 4.33.2, the version the
official reward-training README names and the one that produced ../shared/golden (spec ixc25.md §3, golden §8).
"""
import argparse
import collections
import io
import json
import math
import os
import random
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import sentencepiece as spm
from PIL import Image, ImageDraw

IMAGE_PLACEHOLDER = "<ImageHere>"
REWARD_TOKEN = "[UNUSED_TOKEN_130]"
END_OF_TURN = "[UNUSED_TOKEN_145]"
START_OF_TURN = "[UNUSED_TOKEN_146]"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".wmv")
ROLES = ("system", "user", "assistant")
# official training (data_mix.py conv2text): human/user -> user, system -> system, anything else -> assistant
TRAIN_ROLE = {"human": "user", "user": "user", "system": "system"}
DEFAULT_META = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
    "the provided image."
)


def run_cli(main):
    """Entry points: bad input ends in one clear message and exit status 1, not a traceback (IXC_DEBUG=1 shows it)."""
    import os
    import sys
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError, RuntimeError, json.JSONDecodeError) as e:
        if os.environ.get("IXC_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def positive_int(text):
    """argparse type for counts and sizes (--n, --hd-num, --max-length, ...)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def fraction(text):
    """argparse type for a fraction in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def refuse_existing(paths, inputs=()):
    """Before any work: never write over an input or over a file that is already there (a checkpoint's summary, an
    earlier run's output, anything of the user's)."""
    inputs = {Path(p).resolve() for p in inputs}
    for path in map(Path, paths):
        if path.resolve() in inputs or path.parent.resolve() in inputs:
            raise ValueError(f"refusing to write over the input {path}; choose another output")
        if path.exists() or path.is_symlink():
            raise ValueError(f"refusing to overwrite {path}, which already exists; choose a new output or remove it")
        if path.parent.exists() and not path.parent.is_dir():
            raise ValueError(f"output folder {path.parent} is a file")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


# transformers' `clean_up_tokenization`, in its order
CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class Tokenizer:
    """SentencePiece with the HF slow-tokenizer special-token rules of transformers 4.33.2.

    `<s>`, `</s>`, `<unk>` are registered special strings: typed literally they map to their ids and the
    whitespace on both sides of them is stripped (so the "\\n" before the reward suffix's `</s>` disappears).
    `[UNUSED_TOKEN_k]` are user-defined SentencePiece pieces, so plain SentencePiece keeps them whole.
    """

    SPECIAL = ("<s>", "</s>", "<unk>")

    def __init__(self, model_path):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.eos_id  # config pad_token_id 2 == eos, as in the official tokenizer files
        self.special_ids = {"<s>": self.bos_id, "</s>": self.eos_id, "<unk>": self.unk_id}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIAL) + ")")
        self.reward_id = self.piece_id(REWARD_TOKEN)
        self.eot_id = self.piece_id(END_OF_TURN)
        self.sot_id = self.piece_id(START_OF_TURN)

    def piece_id(self, piece):
        i = self.sp.piece_to_id(piece)
        if i == self.unk_id or self.sp.id_to_piece(i) != piece:
            raise ValueError(f"{self.path}: tokenizer has no piece {piece!r}")
        return i

    def encode(self, text, add_special_tokens=True):
        chunks = self._split.split(text)
        # strip whitespace around every special string (4.33.2 slow-tokenizer default for plain-string specials)
        for i, chunk in enumerate(chunks):
            if chunk in self.special_ids:
                if i > 0:
                    chunks[i - 1] = chunks[i - 1].rstrip()
                if i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
        ids = [self.bos_id] if add_special_tokens else []
        for chunk in chunks:
            if chunk in self.special_ids:
                ids.append(self.special_ids[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids, skip_special_tokens=True):
        """SentencePiece's text, then the slow tokenizer's `clean_up_tokenization`, which InternLM2Tokenizer's
        convert_tokens_to_string always applies (" ?" -> "?", " 's" -> "'s", ...)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not (self.sp.is_control(i) or self.sp.is_unknown(i))]
        text = self.sp.decode(ids)
        for before, after in CLEAN_UP:
            text = text.replace(before, after)
        return text


# ----------------------------------------------------------------------------------------------------------------
# Templates (spec §7)


def reward_template(conversation):
    """The reward prompt: every turn `[UNUSED_TOKEN_146]{role}\\n{content}[UNUSED_TOKEN_145]\\n`, then `</s>` and
    the reward token, whose final hidden state the `score` head reads."""
    text = ""
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or not isinstance(message.get("content"), str):
            raise ValueError(f"conversation message {i} must be a dict with 'role' and a string 'content', "
                             f"got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"conversation message {i}: unknown role {message['role']!r}; expected one of {ROLES}")
        text += f"{START_OF_TURN}{message['role']}\n{message['content']}{END_OF_TURN}\n"
    return text + "</s>" + REWARD_TOKEN


def qa(query, answer):
    """A one-turn conversation in the API's {"role", "content"} form."""
    return [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]


def chat_prompt(query, history=(), meta_instruction=None):
    """The IXC-2.5 chat prompt that ends where the assistant starts to speak (`interleav_wrap_chat`)."""
    text = f"{START_OF_TURN}system\n{meta_instruction}{END_OF_TURN}\n" if meta_instruction else ""
    for user, assistant in history:
        text += f"{START_OF_TURN}user\n{user}{END_OF_TURN}\n{START_OF_TURN}assistant\n{assistant}{END_OF_TURN}\n"
    return text + f"{START_OF_TURN}user\n{query}{END_OF_TURN}\n{START_OF_TURN}assistant\n"


def split_system(conversation):
    """(system prompt or None, the turns after it)."""
    if conversation and conversation[0]["role"] == "system":
        return conversation[0]["content"], conversation[1:]
    return None, conversation


def from_official(conversations):
    """Official training records ({"from", "value"}) -> our {"role", "content"} messages (data_mix.py conv2text)."""
    out = []
    for i, m in enumerate(conversations):
        if not isinstance(m, dict) or "from" not in m or not isinstance(m.get("value"), str):
            raise ValueError(f"message {i} must have 'from' and a string 'value', got {m!r}")
        out.append({"role": TRAIN_ROLE.get(m["from"], "assistant"), "content": m["value"].strip()})
    return out


def with_placeholders(text, n_images, strict=True):
    """One image and no placeholder: the image goes in front of everything (official rule). Otherwise the text should
    carry exactly one `<ImageHere>` per image: data files that do not are refused when read (strict); the model's
    API, like upstream, only warns and splices what the split gives (image i after part i, extra images dropped)."""
    n_found = text.count(IMAGE_PLACEHOLDER)
    if n_images == 1 and n_found == 0:
        return IMAGE_PLACEHOLDER + text
    if n_found != n_images:
        msg = (f"the text has {n_found} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s) were given; put "
               f"one {IMAGE_PLACEHOLDER} per image in the text (e.g. 'Image1 {IMAGE_PLACEHOLDER}; Image2 "
               f"{IMAGE_PLACEHOLDER}; ...')")
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + "; spliced as the official code does", stacklevel=3)
    return text


def tokenize_segments(tokenizer, text, n_images):
    """Split on `<ImageHere>` as the official code does: part 0 is tokenized with BOS even when empty (so BOS comes
    before the first image), later empty parts are skipped, part i is followed by image i if there is one. Returns a
    list of id lists and ints (image indices)."""
    parts = with_placeholders(text, n_images, strict=False).split(IMAGE_PLACEHOLDER)
    segments = []
    for i, part in enumerate(parts):
        if i == 0 or part:
            segments.append(tokenizer.encode(part, add_special_tokens=(i == 0)))
        if i < n_images:
            segments.append(i)
    return segments


# ----------------------------------------------------------------------------------------------------------------
# Data files: the official reward format (conversations_a chosen, conversations_b rejected, image), the official
# fine-tuning format (conversations, image), as a JSON list or JSONL, and data.txt mixtures. Image paths are
# relative to the data file. Every error names the file and row.


def read_rows(path):
    """A JSON list, a single JSON object (pretty-printed or not), or JSONL; a UTF-8 byte-order mark is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    try:
        whole = json.loads(text)
        return whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError as e:
        whole_error = e
        if text.lstrip().startswith("["):
            raise ValueError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if not rows and line.strip() == "{":  # a pretty-printed single object: the whole file's error
                    raise ValueError(f"{path}: malformed JSON at line {whole_error.lineno}: {whole_error.msg}") from None
                raise ValueError(f"{path}:{lineno}: malformed JSON row ({e.msg})") from None
    return rows


def _images(row, base, where):
    image = row.get("image", [])
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(im, str) and im.strip() for im in images):
        raise ValueError(f"{where}: 'image' must be a path or a list of paths (leave it out for a text-only row), "
                         f"got {image!r}")
    out = []
    for im in images:
        p = (base / im) if not Path(im).is_absolute() else Path(im)
        if not p.exists():
            raise FileNotFoundError(f"{where}: image not found: {p}")
        out.append(str(p))
    return out


def _where(path, i, row):
    return f"{path} row {i + 1}" + (f" (id {row['id']!r})" if isinstance(row, dict) and "id" in row else "")


def _check_placeholders(conversation, n_images, where):
    """The model's rule (one image may go without `<ImageHere>`, otherwise one per image), checked when the file is
    read rather than at the training step that first draws the row."""
    try:
        with_placeholders("".join(m["content"] for m in conversation), n_images)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_preference(path):
    """Official reward-training rows -> [{"id", "chosen", "rejected", "images", "kind", "question_kind"}] (role/content
    messages; the two kinds are the built-in world's labels, empty for other data)."""
    path = Path(path)
    out = []
    for i, row in enumerate(read_rows(path)):
        where = _where(path, i, row)
        if not isinstance(row, dict) or "conversations_a" not in row or "conversations_b" not in row:
            raise ValueError(f"{where}: expected 'conversations_a' (chosen) and 'conversations_b' (rejected)")
        try:
            chosen, rejected = from_official(row["conversations_a"]), from_official(row["conversations_b"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        images = _images(row, path.parent, where)
        for conv in (chosen, rejected):
            _check_placeholders(conv, len(images), where)
        out.append({"id": row.get("id", i), "chosen": chosen, "rejected": rejected, "images": images,
                    "kind": row.get("kind", ""), "question_kind": row.get("question_kind", "")})
    return out


def read_sft(path):
    """Official fine-tuning rows -> [{"id", "conversation", "images", ...ground truth kept}]."""
    path = Path(path)
    out = []
    for i, row in enumerate(read_rows(path)):
        where = _where(path, i, row)
        if not isinstance(row, dict) or "conversations" not in row:
            raise ValueError(f"{where}: expected a 'conversations' list of {{'from', 'value'}} messages")
        try:
            conversation = from_official(row["conversations"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        _, turns = split_system(conversation)
        if not turns or [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2):
            raise ValueError(f"{where}: expected user and assistant turns in alternation, ending with the "
                             f"assistant's answer (after an optional system turn), got {[m['role'] for m in turns]}")
        images = _images(row, path.parent, where)
        _check_placeholders(conversation, len(images), where)
        out.append({**row, "id": row.get("id", i), "conversation": conversation, "images": images})
    return out


def read_mixture(path, seed=0, reader=read_preference):
    """`data.txt`: lines `<json path> <k>`: k*1000 samples of that file (down-sampled without replacement or
    up-sampled with it), drawn once per run by seed; the official recipe trains one epoch."""
    path = Path(path)
    rng = random.Random(seed)
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected '<json path> <k>', got {line!r}")
        rows = reader(path.parent / parts[0])
        try:
            n = round(float(parts[1]) * 1000)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: the sample count k must be a number, got {parts[1]!r}") from None
        if n > 0 and not rows:
            raise ValueError(f"{path}:{lineno}: {parts[0]} holds no rows to draw {n} samples from")
        out += rng.sample(rows, n) if n <= len(rows) else rows + rng.choices(rows, k=n - len(rows))
    return out


def check_data(conversation):
    """The official `check_data` on the last message: no chat-markup leftovers, not empty, not one giant word."""
    text = conversation[-1]["content"]
    if "<|im_start|>" in text or "<|im_end|>" in text or not text.strip():
        return False
    words = text.replace("\n", " ").split(" ")
    if not any(words):
        return False
    return not (len(text) > 500 and max(len(w) for w in words) > 100)


def length_ok(pair, max_len_ratio):
    """The paper's length constraint: drop pairs whose chosen answer is much longer than the rejected one, so the
    reward model cannot learn 'longer is better'."""
    c, r = len(pair["chosen"][-1]["content"]), len(pair["rejected"][-1]["content"])
    return c <= max_len_ratio * max(r, 1)


def mix_image_text(has_image, seed=0):
    """The official 2:1 interleave (data_mix.py's counter cycling image, image, text) as an order of sample
    indices: two with images, then one text-only, while both last; each group shuffled by seed."""
    rng = random.Random(seed)
    image = [i for i, im in enumerate(has_image) if im]
    text = [i for i, im in enumerate(has_image) if not im]
    rng.shuffle(image)
    rng.shuffle(text)
    out = []
    while image or text:
        for pool, k in ((image, 2), (text, 1)):
            for _ in range(k):
                if pool:
                    out.append(pool.pop())
    return out


# ----------------------------------------------------------------------------------------------------------------
# The built-in world: tiny grid-of-shapes images with known ground truth, questions, systematic SFT errors and
# preference pairs, written in the official formats so the same readers serve real and built-in data.
# Perception is made easy on purpose: a 112x112 image is a 4x4 grid of 28-px cells, each cell is exactly one
# merged vision token (2x2 ViT patches of 14 px), each object fills one cell, and the colours/shapes are few and
# far apart, so one token's pixels identify colour+shape.

WORLD_VERSION = 6            # train.ensure_world rewrites a cached world written by another version
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
# Batching


def token_budget_batches(lengths, budget, seed=0, shuffle=True, bucket=64, overhead=32):
    """Micro-batches of indices whose padded size (rows x longest) stays within `budget` tokens. Sorting inside
    windows of `bucket` * (typical batch) samples keeps padding low while the order stays random; each sorted
    window is then cut where padded tokens + `overhead` tokens per micro-batch (a forward call's fixed cost) is
    least, instead of filling every micro-batch to the budget, which pads short samples to long ones whenever the
    lengths spread: a world RM step's share pads 18% filled, 7% cut, in the same wall time."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    typical = max(1, budget // max(1, int(sum(lengths) / max(len(lengths), 1))))
    window = bucket * typical
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda i: lengths[i])
        batches += [chunk[i:j] for i, j in _cheapest_cuts([lengths[i] for i in chunk], budget, overhead)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def _cheapest_cuts(sorted_lengths, budget, overhead):
    """[(start, end)] splitting ascending lengths into contiguous micro-batches within `budget` padded tokens
    (a longer single sample stands alone) at the least total rows x longest + overhead (dynamic programming)."""
    n = len(sorted_lengths)
    cost, cut = [0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sorted_lengths[j - 1]
        for i in range(j - 1, -1, -1):
            rows = j - i
            if rows > 1 and rows * longest > budget:
                break
            c = cost[i] + rows * longest + overhead
            if c < cost[j]:
                cost[j], cut[j] = c, i
    spans, j = [], n
    while j:
        spans.append((cut[j], j))
        j = cut[j]
    return spans[::-1]


def padding_waste(lengths, batches):
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - real / padded
