"""The world's files on disk: write_world writes every set in the official formats (images beside them), and
ensure_world keeps one cache of it in runs/world for every command; the world's tokenizer; the preference pairs
shipped beside the policy that sampled them; and held-out prompts.
"""
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

import data
from world import WORLD_DIR, WORLD_SFT, WORLD_VERSION
from world.scene import (FOLLOWUP_SHARE, IMAGE_SHARE, INSTRUCTION_SHARE, PREFACE_SHARE, answer, draw, make_item,
                         save_image, turns)
from world.weaker import clean_set, preference_pairs, sft_rows

SFT_IMAGE_SHARE = 0.9        # the tiny policy learns the text kinds in a few hundred steps; its budget goes to seeing
SFT_INSTRUCTION_SHARE = 0.4
PAIR_MINUTES = 13            # sampling the preference pairs' answers: 11200 prompts x 4, on 2 cores
PAIRS_FILE = "pairs.json.gz"  # beside the SFT policy: the pairs its samples made (ship_pairs)
SPECIAL_PIECES = ["[UNUSED_TOKEN_130]", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]


def _items(rng, n, out_dir, prefix, max_objects=4, heldout=False, image_share=IMAGE_SHARE,
           instruction_share=INSTRUCTION_SHARE, followup_share=FOLLOWUP_SHARE):
    return [save_image(dict(make_item(rng, max_objects, heldout, image_share=image_share,
                                      instruction_share=instruction_share, preface_share=PREFACE_SHARE,
                                      followup_share=followup_share),
                            id=f"{prefix}_{i:05d}"), out_dir) for i in range(n)]


def write_world(out_dir, seed=0, n_sft=40000, n_pref=10000, n_heldout=300, n_sft_easy=2000,
                error_rate=0.7, n_pref_heldout=None, policy=None, n_clean=None, pairs=None):
    """Write every world file under out_dir; returns {name: path}. Deterministic by seed. The preference pairs are
    sampled from `policy` (see weaker.preference_pairs), or are `pairs` ({"pref_train": rows, "pref_heldout":
    rows}, as shipped beside the SFT policy that sampled them; their images are drawn from their rows).
    sft_easy.json holds single-object images for an SFT curriculum warm-up. `error_rate` < 1 keeps the right
    answer in the SFT policy's distribution (greedy still picks the error), so sampling can find it: best-of-N
    and PPO need that, as they do with real models. The held-out preference pairs default to 4 x n_heldout (1200):
    with 300, the reward model's accuracy had a standard error of 0.023, too coarse to rank two recipes."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    n_clean = 2 * n_heldout if n_clean is None else n_clean
    rng = [np.random.default_rng([seed, s]) for s in range(8)]
    sft, errs = sft_rows(rng[5], _items(rng[0], n_sft, out_dir, "sft", image_share=SFT_IMAGE_SHARE,
                                        instruction_share=SFT_INSTRUCTION_SHARE), error_rate)
    easy, easy_errs = sft_rows(rng[5], _items(rng[1], n_sft_easy, out_dir, "easy", max_objects=1,
                                              image_share=SFT_IMAGE_SHARE, instruction_share=0.0,
                                              followup_share=0.0), error_rate)
    held = _heldout_prompts(rng[4], n_heldout, out_dir, "heldout")
    clean = clean_set(np.random.default_rng([seed, 9]),
                      _items(np.random.default_rng([seed, 8]), n_clean, out_dir, "clean", heldout=True))
    if pairs:
        pref, pref_held = pairs["pref_train"], pairs["pref_heldout"]
    else:
        pref = preference_pairs(rng[6], rng[2], n_pref, out_dir, "pref", policy=policy)
        pref_held = preference_pairs(rng[7], rng[3], n_pref_heldout or 4 * n_heldout, out_dir, "prefheld",
                                     heldout=True, policy=policy)
    files = {"sft_train": sft, "sft_easy": easy, "sft_errors": errs + easy_errs, "pref_train": pref,
             "pref_heldout": pref_held, "heldout_prompts": held, "clean_set": clean}
    for row in (pairs["pref_train"] + pairs["pref_heldout"] if pairs else []):
        if "image" in row:
            draw(row["objects"]).save(os.path.join(out_dir, row["image"]), compress_level=1)
    paths = {}
    for name, rows in files.items():
        paths[name] = os.path.join(out_dir, name + ".json")
        with open(paths[name], "w") as f:
            json.dump(rows, f, indent=1)
    return paths


def _heldout_prompts(rng, n, out_dir, prefix):
    """n questions on held-out layouts, each with its reference answer."""
    return [dict(it, answer=answer(it, it["truth"])) for it in _items(rng, n, out_dir, prefix, heldout=True)]


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
# The cache in runs/world, the pairs shipped beside the policy, and held-out prompts


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
