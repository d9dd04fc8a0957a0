"""Tokenizer, prompt templates, data readers and batching for IXC-2.5 / IXC-2.5-Reward (no nn.Module here).

The tokenizer reproduces the official slow `InternLM2Tokenizer` under transformers 4.33.2, the version the
official reward-training README names and the one that produced ../shared/golden (spec ixc25.md §3, golden §8).
"""
import json
import math
import random
import re
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


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


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
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not (self.sp.is_control(i) or self.sp.is_unknown(i))]
        return self.sp.decode(ids)


# ----------------------------------------------------------------------------------------------------------------
# Templates (spec §7)


def reward_template(conversation):
    """The reward prompt: every turn `[UNUSED_TOKEN_146]{role}\\n{content}[UNUSED_TOKEN_145]\\n`, then `</s>` and
    the reward token, whose final hidden state the `score` head reads."""
    text = ""
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"conversation message {i} must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"conversation message {i}: unknown role {message['role']!r}; expected one of {ROLES}")
        text += f"{START_OF_TURN}{message['role']}\n{message['content']}{END_OF_TURN}\n"
    return text + "</s>" + REWARD_TOKEN


def chat_prompt(query, history=(), meta_instruction=None):
    """The IXC-2.5 chat prompt that ends where the assistant starts to speak (`interleav_wrap_chat`)."""
    text = f"{START_OF_TURN}system\n{meta_instruction}{END_OF_TURN}\n" if meta_instruction else ""
    for user, assistant in history:
        text += f"{START_OF_TURN}user\n{user}{END_OF_TURN}\n{START_OF_TURN}assistant\n{assistant}{END_OF_TURN}\n"
    return text + f"{START_OF_TURN}user\n{query}{END_OF_TURN}\n{START_OF_TURN}assistant\n"


def from_official(conversations):
    """Official training records ({"from", "value"}) -> our {"role", "content"} messages (data_mix.py conv2text)."""
    out = []
    for i, m in enumerate(conversations):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise ValueError(f"message {i} must have 'from' and 'value', got {m!r}")
        out.append({"role": TRAIN_ROLE.get(m["from"], "assistant"), "content": str(m["value"]).strip()})
    return out


def with_placeholders(text, n_images):
    """One image and no placeholder: the image goes in front of everything (official rule). Otherwise the text must
    carry exactly one `<ImageHere>` per image."""
    n_found = text.count(IMAGE_PLACEHOLDER)
    if n_images == 1 and n_found == 0:
        return IMAGE_PLACEHOLDER + text
    if n_found != n_images:
        raise ValueError(f"the text has {n_found} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s) were "
                         f"given; put one {IMAGE_PLACEHOLDER} per image in the text (e.g. 'Image1 {IMAGE_PLACEHOLDER}; "
                         f"Image2 {IMAGE_PLACEHOLDER}; ...')")
    return text


def tokenize_segments(tokenizer, text, n_images):
    """Split on `<ImageHere>` as the official code does: part 0 is tokenized with BOS even when empty (so BOS comes
    before the first image), later empty parts are skipped. Returns a list of id lists and ints (image indices)."""
    parts = with_placeholders(text, n_images).split(IMAGE_PLACEHOLDER)
    segments = []
    for i, part in enumerate(parts):
        if i == 0 or part:
            segments.append(tokenizer.encode(part, add_special_tokens=(i == 0)))
        if i < n_images:
            segments.append(i)
    return segments
