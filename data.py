"""Tokenizer, prompt templates, data readers and batching for IXC-2.5 / IXC-2.5-Reward (no nn.Module here).

The tokenizer reproduces the official slow `InternLM2Tokenizer` under transformers 4.33.2, the version the
official reward-training README names and the one behind the official reference outputs (docs/testing.md).
"""
import argparse
import json
import os
import random
import re
import warnings
from pathlib import Path

import sentencepiece as spm

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
    """Entry points: a mistake the user can fix (a missing file; a malformed row, checkpoint or flag value, which
    our input checks raise as ValueError; a missing optional package) ends in one line and exit status 1. Anything
    else is a bug in our code and keeps its traceback: another exception, or a ValueError raised inside a library
    (torch's own shape checks). IXC_DEBUG=1 shows every traceback."""
    import sys
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:
        if os.environ.get("IXC_DEBUG") or not (isinstance(e, FileNotFoundError) or _raised_here(e)):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _raised_here(e):
    """Was `e` raised by a line of this project's own files (an input check), not inside a library?"""
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return Path(__file__).resolve().parent in path.parents and "site-packages" not in path.parts


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of every entry point: the docstring as written, and each flag's default after its help, unless the
    help states it (a default that depends on other flags) or the flag is a switch (off unless given)."""

    def _get_help_string(self, action):
        silent = action.default in (None, argparse.SUPPRESS) or action.default is False or "default" in action.help
        return action.help if silent else f"{action.help} (default: %(default)s)"


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


def atomic_write_bytes(path, data):
    """Write to a temporary name, then rename: a reader (or a killed run) never sees half a file."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


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
# Templates (the reward remote code's apply_chat_template, modeling_internlm_xcomposer2.py)


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


def sft_prompt(sample):
    """The chat prompt that asks a fine-tuning sample's last question: its system turn if any and its earlier turns
    as history (with their images' placeholders). PPO samples answers to it."""
    meta, turns = split_system(sample["conversation"])  # turns: user, assistant, ... (read_sft checks)
    history = [(turns[k]["content"], turns[k + 1]["content"]) for k in range(0, len(turns) - 2, 2)]
    return chat_prompt(turns[-2]["content"], history, meta_instruction=meta)


ANSWER_MARK = "\x00answer\x00"   # stands for an assistant answer while the chat text is split into segments


def sft_segments(tok, sample):
    """(segments, loss flags) of a fine-tuning sample: the chat template turn by turn, each assistant answer and its
    end-of-turn tokenized apart (as generation produces them) and trained on, everything else context. Image
    placeholders may sit in any user turn; one image without a placeholder goes in front (the official rule). A
    one-turn sample gives exactly the chat prompt's segments followed by its answer's."""
    meta, turns = split_system(sample["conversation"])
    text = "".join(("\n" if k else "") + chat_prompt(turns[k]["content"], meta_instruction=None if k else meta)
                   + ANSWER_MARK for k in range(0, len(turns), 2))
    text = with_placeholders(text, len(sample["images"]))
    answers = iter(turns[k]["content"] + END_OF_TURN for k in range(1, len(turns), 2))
    segments, flags, n_image = [], [], 0
    for i, part in enumerate(re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{ANSWER_MARK})", text)):
        if part == IMAGE_PLACEHOLDER:
            segments.append(n_image)
            n_image += 1
            continue
        if part == ANSWER_MARK:
            ids, train = tok.encode(next(answers), add_special_tokens=False), True
        elif i == 0 or part:  # the first part carries BOS even when empty, as tokenize_segments does
            ids, train = tok.encode(part, add_special_tokens=(i == 0)), False
        else:
            continue
        segments.append(ids)
        flags += [train] * len(ids)
    return segments, flags


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


def _images(row, base, where, must_exist=True):
    image = row.get("image", [])
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(im, str) and im.strip() for im in images):
        raise ValueError(f"{where}: 'image' must be a path or a list of paths (leave it out for a text-only row), "
                         f"got {image!r}")
    out = []
    for im in images:
        p = (base / im) if not Path(im).is_absolute() else Path(im)
        if must_exist and not p.exists():
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


def read_preference(path, images_must_exist=True):
    """Official reward-training rows -> [{"id", "chosen", "rejected", "images", "kind", "question_kind", "family",
    "source"}] (role/content messages; the last four are the built-in world's labels, empty for other data). A
    missing image is an error here unless `images_must_exist` is off (scoring that skips such rows)."""
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
        images = _images(row, path.parent, where, images_must_exist)
        for conv in (chosen, rejected):
            _check_placeholders(conv, len(images), where)
        out.append({"id": row.get("id", i), "chosen": chosen, "rejected": rejected, "images": images,
                    "kind": row.get("kind", ""), "question_kind": row.get("question_kind", ""),
                    "family": row.get("family", ""), "source": row.get("source", "")})
    return out


def read_sft(path, images_must_exist=True):
    """Official fine-tuning rows -> [{"id", "conversation", "images", ...ground truth kept}]; a missing image as in
    read_preference."""
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
        images = _images(row, path.parent, where, images_must_exist)
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
