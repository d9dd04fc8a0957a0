"""Training stages: SFT of the policy, the reward model (paper Eq. 1), and PPO (ppo.py), one file, any scale.

    torchrun --standalone --nproc_per_node 2 train.py --stage rm --out runs/rm     # built-in world, 2 CPU procs
    python train.py --stage sft --out runs/sft                                      # rebuild the world's SFT policy
    torchrun --nproc_per_node 8 train.py --stage rm --init internlm-xcomposer2d5-7b-reward \\
        --data data.txt --fsdp --grad-ckpt --out runs/rm7b                          # the official recipe, on GPUs

Without --data every stage uses the built-in world (data.py) and starts from the world's SFT policy shipped in
checkpoints/world-sft, as the paper starts from IXC-2.5. Outputs in --out: config.json + model.safetensors
(+ tokenizer.model) loadable by from_pretrained, resume.safetensors (model, optimizer, RNG, step) for --resume,
metrics.jsonl and summary.json. Every file is written to a temporary name and renamed.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import random
import re
import sys
import time
from datetime import timedelta
from pathlib import Path
try:
    import fcntl
except ImportError:  # not POSIX: no lock (let one process write the world first)
    fcntl = None

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import data
from model import Config, InternLMXComposer2, atomic_write_text, init_weights
from vision import sincos_position_embedding
from reward import RewardModel

ROOT = Path(__file__).resolve().parent
WORLD_DIR = ROOT / "runs" / "world"  # generated on first use, deterministic by seed
WORLD_SFT = ROOT / "checkpoints" / "world-sft"  # shipped: the world's pretrained policy (see its summary.json)
# the tiny model of the built-in world: 112-px crops (4x4 merged tokens per view), a few narrow layers
WORLD_CONFIG = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, plora_rank=16, max_position_embeddings=4096, max_length=512,
                    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=112, patch_size=14))
# the official recipe (script_train.sh: lr 1e-5, wd 0.1, beta2 0.95, warmup 1%, cosine, clip 1.0, hd_num 9,
# max_length 8192) and, where the tiny world needs other values, the world's
DEFAULTS = {
    "sft": dict(lr=1e-5, steps=1000, batch=32, token_budget=4096, world=dict(lr=1e-3, steps=6000, batch=32,
                                                                             token_budget=1024)),
    "rm": dict(lr=1e-5, steps=1000, batch=16, token_budget=4096, world=dict(lr=3e-4, steps=750, batch=32,
                                                                            token_budget=1024)),
    "ppo": dict(lr=1e-6, steps=100, batch=16, token_budget=4096, world=dict(lr=1e-4, steps=120, batch=48)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["sft", "rm", "ppo"])
    p.add_argument("--out", required=True, help="output directory (created; an existing run needs --resume)")
    p.add_argument("--data", help="JSON/JSONL in the official format, or a data.txt mixture (default: the world)")
    p.add_argument("--heldout", help="with --data: held-out set to evaluate on (rm: preference pairs; sft: world "
                                     "held-out prompts such as runs/world/heldout_prompts.json, judged by its checker)")
    p.add_argument("--init", help="starting checkpoint (default: the world's SFT policy; sft: from scratch)")
    p.add_argument("--rm", nargs="+", help="ppo: reward model dir(s), averaged when several")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch", type=int, help="samples (rm: pairs; ppo: prompts) per optimizer step, all ranks")
    p.add_argument("--token-budget", type=int, help="max padded tokens per micro-batch (memory follows this; rm: "
                   "a pair counts as its longer side, and its two answers run together, so up to twice this)")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--warmup", type=float, default=0.01, help="warmup fraction of the steps, then cosine to 0")
    p.add_argument("--clip", type=float, default=1.0, help="global grad-norm clip")
    p.add_argument("--head", choices=["linear", "mlp"], default="linear", help="rm: IXC's score or BaseReward's")
    p.add_argument("--hd-num", type=int, default=9)
    p.add_argument("--train-transform", action="store_true",
                   help="the official training HD transform (1.5x wider grid, centred padding) instead of inference's")
    p.add_argument("--max-length", type=int, default=8192)
    p.add_argument("--share-prefix", type=int, default=1, choices=[0, 1],
                   help="rm: run a pair's common image + prompt once for both answers (1) or score each alone (0); "
                   "always 0 under --fsdp")
    p.add_argument("--max-len-ratio", type=float, default=2.5,
                   help="rm: drop pairs whose chosen answer is more than this many times longer than the rejected")
    p.add_argument("--freeze-vision", choices=["auto", "yes", "no"], default="auto",
                   help="auto: frozen (ViT + vision_proj) except when sft builds a model from scratch")
    p.add_argument("--layers", type=int, default=WORLD_CONFIG["num_hidden_layers"],
                   help="sft from scratch: decoder layers of the world's tiny model")
    p.add_argument("--width", type=int, default=WORLD_CONFIG["hidden_size"],
                   help="sft from scratch: decoder hidden size (4 heads, 2 KV heads)")
    p.add_argument("--ffn", type=int, default=WORLD_CONFIG["intermediate_size"],
                   help="sft from scratch: SwiGLU intermediate size")
    p.add_argument("--vit-pos", type=float, default=4.0,
                   help="sft from scratch: amplitude of the ViT's 2-D sin-cos position table (0: CLIP's N(0, 0.02))")
    p.add_argument("--eval-every", type=int, default=0, help="0: only at the end")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--stop-after", type=int, help="save and exit after this many steps in this invocation (job time "
                   "limits); --resume continues")
    p.add_argument("--fsdp", action="store_true", help="sft, rm under torchrun: shard weights, gradients and optimizer "
                   "state across processes (FSDP2) instead of replicating them (DDP), for models that do not fit one GPU")
    p.add_argument("--grad-ckpt", action="store_true", help="sft, rm: recompute each decoder layer's activations in "
                   "backward (the official script's gradient_checkpointing): activation memory for ~1/3 more time")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto",
                   help="sft, rm: bf16 autocast of the forward passes over fp32 weights; auto: on CUDA, off on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-dir", default=str(WORLD_DIR))
    from ppo import add_args as add_ppo_args  # PPO's hyper-parameters live next to its code
    add_ppo_args(p)
    a = p.parse_args(argv)
    d = DEFAULTS[a.stage]
    for k in ("lr", "steps", "batch", "token_budget"):
        if getattr(a, k) is None:
            setattr(a, k, (d["world"] if a.data is None else d).get(k, d[k]))
    return a


# ----------------------------------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK/WORLD_SIZE; one process without it. DDP (or FSDP2) does the gradient reduction.


def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    # rank 0 alone writes checkpoints and evaluates while the others wait in a collective: a 7B checkpoint with its
    # optimizer state can take longer than the default 10-minute timeout
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size(), device


class Whole(torch.nn.Module):
    """What DDP / FSDP wrap: a forward that is a whole loss or evaluation, fn(model, *args). The token embeddings and
    image separators are used before model.forward (splicing); inside this forward FSDP has them gathered, and
    their gradients are reduced once the whole backward is done."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def check_replicas(model, world, what):
    """Under DDP every rank holds the same weights (same start, averaged gradients, same step). A gradient that
    missed the all-reduce shows here as ranks that disagree, instead of as a silently worse model."""
    if world == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, dist.ReduceOp.MIN)
    dist.all_reduce(hi, dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"the ranks hold different {what} weights: gradients were not averaged across ranks")


def wrap_model(model, a, world):
    """One process: as is. torchrun: DDP, or with --fsdp FSDP2 with one all-gather / reduce-scatter unit per decoder
    layer and the root (embeddings, norm, head, separators) as another."""
    whole = Whole(model)
    if world == 1:
        return whole
    if not a.fsdp:
        return torch.nn.parallel.DistributedDataParallel(whole, find_unused_parameters=True)
    # frozen parameters (ViT + vision_proj for rm) stay whole on every rank: no gradient or optimizer state to
    # shard, and small next to the decoder
    frozen = {p for p in model.parameters() if not p.requires_grad}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(whole, ignored_params=frozen)
    # PLoRA and the separators get no gradient on a rank whose micro-batch has no image: reduce zeros there (as
    # DDP's find_unused_parameters) so the ranks' reduce-scatters match
    whole.set_reduce_scatter_unused_params(True)
    return whole


def to_cpu(t, keep=True):
    """A tensor on the CPU, gathered whole first if FSDP shards it (a collective: every rank calls it; only the
    `keep` ones hold the result)."""
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().contiguous().cpu() if keep else None


def like(t, ref):
    """A whole tensor laid out as `ref`: this rank's shard when FSDP shards `ref` (every rank read the same file)."""
    return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None) \
        if isinstance(ref, DTensor) else t


def log(rank, *a):
    if rank == 0:
        print(*a, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Data for each stage


def ensure_world(world_dir):
    """Write the built-in world once (deterministic by seed) and return its file paths. Every torchrun rank calls
    this: a lock file lets one write while the others wait, then read (they used to write it all at once)."""
    world_dir = Path(world_dir)
    done = world_dir / "world.json"

    def current():
        return done.is_file() and json.loads(done.read_text()).get("version") == data.WORLD_VERSION

    if not current():  # a complete cache is only read, so it may sit on a read-only disk
        world_dir.mkdir(parents=True, exist_ok=True)
        with open(world_dir / ".lock", "w") as lock:
            if fcntl:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not current():
                print(f"writing the built-in world (version {data.WORLD_VERSION}) to {world_dir}: images, data files "
                      f"and tokenizer, about a minute, once", file=sys.stderr, flush=True)
                paths = data.write_world(str(world_dir), seed=0)
                rows = sum((json.loads(Path(p).read_text()) for p in paths.values()), [])
                data.train_world_tokenizer(data.template_texts(rows), str(world_dir / "tokenizer.model"))
                files = {k: Path(p).name for k, p in paths.items()}
                atomic_write_text(done, json.dumps({"version": data.WORLD_VERSION, "files": files}, indent=1))
    return {k: world_dir / name for k, name in json.loads(done.read_text())["files"].items()}


def sft_prompt(sample):
    """The chat prompt that asks a fine-tuning sample's last question: its system turn if any and its earlier turns
    as history (with their images' placeholders). PPO samples answers to it."""
    meta, turns = data.split_system(sample["conversation"])  # turns: user, assistant, ... (read_sft checks)
    history = [(turns[k]["content"], turns[k + 1]["content"]) for k in range(0, len(turns) - 2, 2)]
    return data.chat_prompt(turns[-2]["content"], history, meta_instruction=meta)


ANSWER_MARK = "\x00answer\x00"   # stands for an assistant answer while the chat text is split into segments


def sft_segments(tok, sample):
    """(segments, loss flags) of a fine-tuning sample: the chat template turn by turn, each assistant answer and its
    end-of-turn tokenized apart (as generation produces them) and trained on, everything else context. Image
    placeholders may sit in any user turn; one image without a placeholder goes in front (the official rule). A
    one-turn sample gives exactly the chat prompt's segments followed by its answer's."""
    meta, turns = data.split_system(sample["conversation"])
    text = "".join(("\n" if k else "") + data.chat_prompt(turns[k]["content"], meta_instruction=None if k else meta)
                   + ANSWER_MARK for k in range(0, len(turns), 2))
    text = data.with_placeholders(text, len(sample["images"]))
    answers = iter(turns[k]["content"] + data.END_OF_TURN for k in range(1, len(turns), 2))
    segments, flags, n_image = [], [], 0
    for i, part in enumerate(re.split(f"({re.escape(data.IMAGE_PLACEHOLDER)}|{ANSWER_MARK})", text)):
        if part == data.IMAGE_PLACEHOLDER:
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


def load_stage_data(a, tok, rank):
    """Training and held-out samples for the stage, filtered as the official code and the paper do."""
    world = ensure_world(a.world_dir) if a.data is None else None
    if a.stage == "sft":
        if world is None:
            path = Path(a.data)
            rows = data.read_mixture(path, a.seed, data.read_sft) if path.suffix == ".txt" else data.read_sft(path)
            return rows, heldout_items(a.heldout) if a.heldout else []
        # curriculum: the first epoch starts with the single-object images (see the training loop)
        return [dict(s, warmup=True) for s in data.read_sft(world["sft_easy"])] + data.read_sft(world["sft_train"]), \
            heldout_items(world["heldout_prompts"])
    if world is None:
        path = Path(a.data)
        pairs = data.read_mixture(path, a.seed) if path.suffix == ".txt" else data.read_preference(path)
        held = data.read_preference(a.heldout) if a.heldout else []
    else:
        pairs, held = data.read_preference(world["pref_train"]), data.read_preference(world["pref_heldout"])
    kept = [p for p in pairs if data.check_data(p["chosen"]) and data.check_data(p["rejected"])]
    n_check = len(pairs) - len(kept)
    pairs = [p for p in kept if data.length_ok(p, a.max_len_ratio)]
    log(rank, f"data: {len(pairs)} pairs kept; check_data dropped {n_check}, length constraint "
              f"(chosen <= {a.max_len_ratio} x rejected) dropped {len(kept) - len(pairs)}")
    return pairs, held


def sample_length(tok, sample, crop, grid, hd_num):
    """Tokens of a sample (rm: its longer side) without running the model: image tokens from the image size."""
    from vision import hd_grid, n_image_tokens
    from PIL import Image
    n_img = 0
    hd = 6 if len(sample["images"]) > 1 else hd_num
    for im in sample["images"]:
        if Path(im).suffix.lower() in data.VIDEO_SUFFIXES or Path(im).is_dir():
            n_img += n_image_tokens(32, 1, grid)  # an upper bound; the exact strip is built at load time
        else:
            try:
                with Image.open(im) as f:  # the header is enough for the size
                    n_img += n_image_tokens(*hd_grid(*f.size, hd, crop), grid)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read image {im}: not a valid image file ({e})") from None
    convs = [sample["chosen"], sample["rejected"]] if "chosen" in sample else [sample["conversation"]]
    text = max(len(tok.encode(data.reward_template(c).replace(data.IMAGE_PLACEHOLDER, ""))) for c in convs)
    return n_img + text


# ----------------------------------------------------------------------------------------------------------------
# Losses


def sft_loss(model, batch_samples, tok, a):
    """Teacher-forced next-token loss on assistant tokens only (every answer of a multi-turn sample): each sample's
    mean over its answer tokens, summed over samples (the caller divides by the batch)."""
    seqs, flags = [], []
    for s in batch_samples:
        segments, f = sft_segments(tok, s)
        seqs.append((segments, model.load_images(s["images"], a.hd_num, a.train_transform)))
        flags.append(torch.tensor(f, device=model.device))
    batch = model.embed_batch(seqs)
    labels = torch.full_like(batch["ids"], -100)
    for b, f in enumerate(flags):
        text = (batch["ids"][b] != -100).nonzero().squeeze(1)  # text positions in order (images and padding: -100)
        labels[b, text[f]] = batch["ids"][b, text[f]]
    logits = model(batch["embeds"], batch["im_mask"], batch["attention_mask"])
    target = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")
    return (ce.sum(1) / (target != -100).sum(1)).sum()


def rm_rewards(model, pairs, a):
    """Rewards of chosen and rejected in one forward (the official interleave c0, r0, c1, r1, ...), each pair's
    shared image and prompt run once (RewardModel.pair_rewards: the same numbers as scoring each alone)."""
    seqs = [model.sequence(data.reward_template(conv), p["images"], a.hd_num, a.train_transform)
            for p in pairs for conv in (p["chosen"], p["rejected"])]
    r = model.pair_rewards(seqs, a.max_length) if a.share_prefix else model.rewards_alone(seqs, a.max_length)
    return r[0::2], r[1::2]


def bt_loss(chosen, rejected):
    """Paper Eq. 1: -log sigmoid(r_chosen - r_rejected), summed over pairs (the caller divides by the batch)."""
    return -F.logsigmoid(chosen - rejected).sum()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_policy(model, items, hd_num=9, batch=64, max_new_tokens=48):
    """Greedy held-out accuracy of a policy on world items, overall and per question kind (world checker)."""
    model.eval()
    correct, by_kind = [], {}
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        prompts = [(it["question"], [str(Path(it["_dir"]) / it["image"])] if "image" in it else []) for it in chunk]
        for it, ans in zip(chunk, model.answer(prompts, hd_num, max_new_tokens)):
            ok = data.is_correct(it, ans)
            correct.append(ok)
            by_kind.setdefault(it["kind"], []).append(ok)
    return sum(correct) / len(correct), {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}


@torch.no_grad()
def eval_rm(model, pairs, a, batch=32):
    model.eval()
    chosen, rejected = [], []
    for s in range(0, len(pairs), batch):
        c, r = rm_rewards(model, pairs[s:s + batch], a)
        chosen += c.tolist()
        rejected += r.tolist()
    ok = [c > r for c, r in zip(chosen, rejected)]
    by_kind, by_question = {}, {}
    for p, o in zip(pairs, ok):
        by_kind.setdefault(p["kind"] or "all", []).append(o)
        if p["kind"] == "wrong_value" and p.get("question_kind"):   # the pairs that need the image (or the sum)
            by_question.setdefault(p["question_kind"], []).append(o)
    allr = torch.tensor(chosen + rejected)
    return {"heldout_accuracy": sum(ok) / len(ok),
            "heldout_accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "wrong_value_accuracy_by_question_kind": {k: sum(v) / len(v) for k, v in sorted(by_question.items())},
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(ok),
            "reward_mean": allr.mean().item(), "reward_std": allr.std().item()}


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


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, checkpoints


def make_optimizer(model, a):
    """AdamW; no weight decay on norms, biases, separators and other vectors."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if p.dim() >= 2], "weight_decay": a.weight_decay},
              {"params": [p for n, p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, a.beta2), eps=1e-8)


def lr_at(step, a):
    """Linear warmup over --warmup of the steps, then cosine to zero."""
    warm = max(1, int(a.warmup * a.steps))
    if step < warm:
        return a.lr * (step + 1) / warm
    return a.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, a.steps - warm)))


def save_checkpoint(out, model, opt, step, extra=None, write=True):
    """model (from_pretrained layout) and resume.safetensors (model + optimizer + RNG + step), each atomic; the
    resume file alone is enough to continue, so a kill between the two writes loses nothing. Under FSDP every rank
    calls it to gather the shards, and the one with `write` writes whole tensors, the layout of an unsharded run."""
    weights = {k: to_cpu(v, write) for k, v in model.state_dict().items()}
    tensors = {f"model.{k}": v for k, v in weights.items()}
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = to_cpu(v, write)
    if not write:
        return
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": opt_state["param_groups"], "python_rng": random.getstate(),
            **(extra or {})}
    tmp = out / "resume.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    os.replace(tmp, out / "resume.safetensors")
    model.save_pretrained(out, metadata={"step": step}, state=weights)


def load_checkpoint(out, model, opt):
    """Restore model, optimizer and RNG from resume.safetensors; returns (step, metadata). Under FSDP each rank keeps
    its shard of every tensor, read one at a time."""
    path = out / "resume.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {out} (expected {path.name})")
    ref, params, weights, state = model.state_dict(), [p for g in opt.param_groups for p in g["params"]], {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        for k in f.keys():
            if k.startswith("model."):
                weights[k[6:]] = like(f.get_tensor(k), ref.get(k[6:]))
            elif k.startswith("optim."):
                _, i, name = k.split(".", 2)  # Adam's moments are laid out as their parameter, its step count is not
                state.setdefault(int(i), {})[name] = f.get_tensor(k) if name == "step" else \
                    like(f.get_tensor(k), params[int(i)])
        rng = f.get_tensor("rng.torch")
    model.load_state_dict(weights)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(rng)
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in meta["python_rng"]))
    return meta["step"], meta


def trim_metrics(path, step):
    """On resume, forget log lines of steps after the checkpoint: they are about to be run again. A line cut short
    by the kill is dropped too."""
    def before(line):
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:
            return False
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if before(line)]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# SFT and RM


def build_model(a, device):
    """sft: the world's tiny policy from scratch (or --init); rm: --init (default the world SFT) with a fresh head."""
    if a.stage == "sft":
        if a.init:
            return InternLMXComposer2.from_pretrained(a.init, device=device)
        world = ensure_world(a.world_dir)
        tok = data.Tokenizer(world["sft_train"].parent / "tokenizer.model")
        shape = dict(num_hidden_layers=a.layers, hidden_size=a.width, intermediate_size=a.ffn)
        cfg = Config(**{**WORLD_CONFIG, **shape}, vocab_size=tok.vocab_size)
        model = init_weights(InternLMXComposer2(cfg), a.seed)
        if a.vit_pos:
            table = model.vit.vision_tower.vision_model.embeddings.position_embedding.weight
            with torch.no_grad():
                table.copy_(sincos_position_embedding(cfg.vision.grid, cfg.vision.hidden_size, a.vit_pos))
        model.to(device)
        model.tokenizer = tok
        return model
    head = {"linear": "score", "mlp": "score_mlp"}[a.head]
    return RewardModel.from_pretrained(a.init or WORLD_SFT, device=device, head=head, seed=a.seed)


def main(argv=None):
    a = parse_args(argv)
    rank, world, device = setup_distributed()
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    sharded = world > 1 and a.fsdp
    if (sharded or a.grad_ckpt) and a.share_prefix:
        # FSDP2 re-gathers a layer for backward from hooks on the layer's outputs; the prefix's keys/values leave a
        # layer without passing through its output, so their backward would find the weights already freed.
        # Checkpointing recomputes a layer in backward, which would append the prefix's keys/values a second time
        a.share_prefix = 0
    if a.heldout and (a.data is None or a.stage == "ppo"):
        raise SystemExit("error: --heldout goes with --data in stages sft and rm (the world brings its own held-out set)")
    if a.fsdp and a.stage == "ppo":
        raise SystemExit("error: --fsdp covers --stage sft and rm; ppo replicates its models with DDP")
    if a.batch < world:  # a rank with no sample would never join the step's all-reduce
        raise SystemExit(f"error: --batch {a.batch} is smaller than the {world} processes; each needs a sample")
    if sharded and a.batch % world:  # equal shares let every rank run as many micro-batches (see the loop)
        raise SystemExit(f"error: --fsdp needs --batch ({a.batch}) divisible by the {world} processes")
    if a.stage == "ppo":
        import ppo
        result = ppo.train(a, rank, world, device)
    else:
        result = run_stage(a, rank, world, device, sharded)
    if world > 1:
        # a gloo group left for the interpreter's exit can abort it ("terminate called without an active
        # exception", pytorch#190489). DDP's and FSDP's hooks keep the models, which hold the group, in reference
        # cycles: collect them, then destroy the group while the interpreter is whole
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return result


def run_stage(a, rank, world, device, sharded):
    """The sft / rm loop; returns the summary (None when --stop-after stopped it)."""
    out = Path(a.out)
    if (out / "resume.safetensors").exists() and not a.resume:
        raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model = build_model(a, device)
    model.model.gradient_checkpointing = a.grad_ckpt
    scratch = a.stage == "sft" and not a.init
    if a.freeze_vision == "yes" or (a.freeze_vision == "auto" and not scratch):
        for p in list(model.vit.parameters()) + list(model.vision_proj.parameters()):
            p.requires_grad_(False)  # the paper freezes the vision encoder and projector
    tok = model.tokenizer
    samples, held = load_stage_data(a, tok, rank)
    fwd = wrap_model(model, a, world)  # before the optimizer: FSDP replaces the parameters by their shards
    opt = make_optimizer(model, a)
    step = 0
    if a.resume:
        step, _ = load_checkpoint(out, model, opt)
        log(rank, f"resumed {out} at step {step}")
        if rank == 0:
            trim_metrics(out / "metrics.jsonl", step)
    bf16 = a.autocast == "bf16" or (a.autocast == "auto" and device.type == "cuda")
    amp = lambda: torch.autocast(device.type, torch.bfloat16, enabled=bf16)  # noqa: E731  weights stay fp32

    def checkpoint():  # FSDP: every rank gathers its shards, rank 0 writes
        if rank == 0 or sharded:
            save_checkpoint(out, model, opt, step, write=rank == 0)

    def evaluate_now():  # FSDP: every rank evaluates, through the root, so that the layers' all-gathers pair up
        with amp():
            result = fwd(evaluate, a, held) if sharded else evaluate(model, a, held)
        if sharded:
            fwd.reshard()  # FSDP2 leaves the root gathered after a forward, for a backward that is not coming
        return result

    crop, grid = model.cfg.vision.image_size, model.cfg.vision.grid
    lengths = [sample_length(tok, s, crop, grid, a.hd_num) for s in samples]
    per_epoch = max(1, len(samples) // a.batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(rank, f"{a.stage}: {len(samples)} samples, {a.steps} steps of {a.batch}, {world} process(es), "
              f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    t0, tokens, order_epoch, order, first_step, waste = time.time(), 0, -1, None, step, []
    saved_step = step if a.resume else None
    while step < a.steps:
        epoch = step // per_epoch
        if epoch != order_epoch:  # a fresh random order per epoch, identical on every rank
            if a.stage == "rm":  # the official stream: image, image, text, ... so every step holds both, 2:1
                order = data.mix_image_text([bool(s["images"]) for s in samples], a.seed + epoch)
            else:
                order = list(range(len(samples)))
                random.Random(a.seed + epoch).shuffle(order)
            if epoch == 0:  # stable: warm-up samples first, each group still shuffled
                order.sort(key=lambda i: not samples[i].get("warmup"))
            order_epoch = epoch
        at = (step % per_epoch) * a.batch
        # steps stay random (length-sorted steps would make each one a single kind of sample); inside a step,
        # samples are sorted by length and packed into micro-batches of at most --token-budget padded tokens
        step_items = sorted(order[at:at + a.batch], key=lambda i: lengths[i])
        mine = step_items[rank::world]
        model.train()
        micro = data.token_budget_batches([lengths[i] for i in mine], a.token_budget, shuffle=False)
        if sharded:  # each forward all-gathers every layer: all ranks run as many micro-batches, the largest split
            n = torch.tensor(len(micro), device=device)  # NCCL reduces device tensors only
            dist.all_reduce(n, dist.ReduceOp.MAX)
            while len(micro) < n:
                micro.sort(key=len)
                big = micro.pop()
                micro += [big[:len(big) // 2], big[len(big) // 2:]]
        waste.append((sum(lengths[mine[i]] for b in micro for i in b),
                      sum(max(lengths[mine[i]] for i in b) * len(b) for b in micro)))
        loss_total, n_correct = 0.0, 0
        for k, mb in enumerate(micro):
            items = [samples[mine[i]] for i in mb]
            # DDP all-reduces on the last micro-batch only; every rank has one, since batch >= processes. FSDP
            # reduce-scatters after each, so that only a shard of the gradients is ever held
            ddp_wait = world > 1 and not sharded and k < len(micro) - 1
            with fwd.no_sync() if ddp_wait else contextlib.nullcontext():
                with amp():
                    if a.stage == "sft":
                        loss_sum = fwd(sft_loss, items, tok, a)
                    else:
                        c, r = fwd(rm_rewards, items, a)
                        loss_sum = bt_loss(c, r)
                        n_correct += (c > r).sum().item()
                (loss_sum * world / a.batch).backward()  # DDP and FSDP average over ranks: the global mean
            loss_total += loss_sum.item()
            tokens += sum(lengths[mine[i]] for i in mb) * (2 if a.stage == "rm" else 1)
        if not math.isfinite(loss_total):
            last = f"the last good checkpoint is {out} (step {saved_step})" if saved_step is not None \
                else "no checkpoint was written yet"
            raise SystemExit(f"error: loss is {loss_total} at step {step + 1}; stopping without saving; {last}")
        grad_norm = to_cpu(torch.nn.utils.clip_grad_norm_(trainable, a.clip)).item()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        rec = {"step": step, "loss": loss_total / len(mine), "grad_norm": grad_norm, "lr": lr_at(step - 1, a),
               "padding_waste": 1 - sum(r for r, _ in waste[-10:]) / sum(p for _, p in waste[-10:])}
        if a.stage == "rm":
            rec["accuracy"] = n_correct / len(mine)
        elapsed = time.time() - t0
        rec["tokens_per_s"] = tokens * world / elapsed
        if rank == 0 and (step % 10 == 0 or step == a.steps):
            eta = elapsed / (step - first_step) * (a.steps - step)
            print(f"step {step}/{a.steps} loss {rec['loss']:.4f}" + (f" acc {rec['accuracy']:.3f}" if "accuracy" in rec
                  else "") + f" lr {rec['lr']:.2e} pad {rec['padding_waste']:.2f} tok/s {rec['tokens_per_s']:.0f} eta {eta:.0f}s", flush=True)
            append_jsonl(out / "metrics.jsonl", rec)
        if step % a.save_every == 0 or step == a.steps:
            checkpoint()
            saved_step = step
        if a.eval_every and step % a.eval_every == 0 and step < a.steps and (rank == 0 or sharded):
            metrics = evaluate_now()
            if rank == 0:
                append_jsonl(out / "metrics.jsonl", {"step": step, **metrics})
        if a.stop_after and step - first_step >= a.stop_after and step < a.steps:
            checkpoint()
            log(rank, f"stopped after {a.stop_after} steps at step {step}; continue with --resume")
            return None
    summary = {"stage": a.stage, "steps": step, "seconds": round(time.time() - t0, 1), "processes": world,
               "command": " ".join(sys.argv), "seed": a.seed}
    if rank == 0 or sharded:
        summary.update(evaluate_now())
        if a.stage == "rm" and "reward_mean" in summary:
            model.cfg.reward_mean, model.cfg.reward_std = summary["reward_mean"], summary["reward_std"]
            weights = {k: to_cpu(v, rank == 0) for k, v in model.state_dict().items()}
            if rank == 0:
                model.save_pretrained(out, metadata={"step": step}, state=weights)
    if rank == 0:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    return summary


def evaluate(model, a, held):
    if not held:
        return {}
    if a.stage == "sft":
        acc, by_kind = eval_policy(model, held, a.hd_num)
        return {"heldout_accuracy": acc, "heldout_accuracy_by_kind": by_kind}
    return eval_rm(model, held, a)


if __name__ == "__main__":
    data.run_cli(main)
