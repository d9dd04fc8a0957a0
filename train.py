"""The launcher: `--stage sft` fine-tunes the chat policy, `--stage rm` trains the reward model (paper Eq. 1),
`--stage ppo` runs PPO (ppo.py). One process, or torchrun with DDP (FSDP2 with --fsdp).

    torchrun --standalone --nproc_per_node 2 train.py --stage rm --out runs/rm     # built-in world, 2 CPU procs
    torchrun --standalone --nproc_per_node 2 train.py --stage sft --out runs/sft   # rebuild the world's SFT policy
    torchrun --nproc_per_node 8 train.py --stage rm --init internlm-xcomposer2d5-7b-reward \\
        --data data.txt --fsdp --grad-ckpt --out runs/rm7b                          # the official recipe, on GPUs

Without --data every stage uses the built-in world (world/) and starts from the world's SFT policy shipped in
checkpoints/world-sft, as the paper starts from IXC-2.5. Outputs in --out: config.json + model.safetensors
(+ tokenizer.model) loadable by from_pretrained, resume.safetensors (model, optimizer, RNG, step) for --resume,
metrics.jsonl, curves.svg and summary.json. Every file is written to a temporary name and renamed.
"""
import argparse
import functools
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import ppo
from world import COLOURS, GRID, IMG, SHAPES, WORLD_CONFIG, WORLD_DIR, WORLD_SFT, checker, scene, store, weaker
from model import Config, InternLMXComposer2, add_layers, init_weights
from reward import RewardModel
from vision import hd_transform, sample_length, sincos_position_embedding, to_pixels

# Settings per stage: the official recipe on real data (script_train.sh: lr 1e-5, wd 0.1, beta2 0.95, warmup 1%,
# cosine, clip 1.0, hd_num 9, max_length 8192), and the built-in world's overrides where the tiny world needs
# other values. Flags a stage does not read are refused for it (STAGE_FLAGS).
RECIPE = {"sft": dict(lr=1e-5, steps=1000, batch=32, token_budget=4096, eval_every=0),
          "rm": dict(lr=1e-5, steps=1000, batch=16, token_budget=4096, eval_every=0),
          "ppo": dict(lr=1e-6, steps=100, batch=16, token_budget=4096, eval_every=0, kl_coef=0.05)}
WORLD = {"sft": dict(lr=1e-3, steps=6000, batch=32, token_budget=1024, eval_every=0),
         "rm": dict(lr=3e-4, steps=750, batch=32, token_budget=1024, eval_every=0),
         "ppo": dict(lr=1e-4, steps=120, batch=48, token_budget=4096, eval_every=20, kl_coef=0.1)}
SHARED_FLAGS = {"stage", "out", "data", "init", "resume", "steps", "batch", "token_budget", "lr", "weight_decay",
                "beta2", "warmup", "clip", "hd_num", "save_every", "stop_after", "seed", "world_dir"}
STAGE_FLAGS = {
    "sft": {"heldout", "train_transform", "freeze_vision", "layers", "width", "ffn", "vit_pos", "vision_steps",
            "tokenizer", "truth", "eval_every", "fsdp", "grad_ckpt", "autocast"},
    "rm": {"heldout", "train_transform", "max_length", "freeze_vision", "head", "share_prefix", "max_len_ratio",
           "center_coef", "add_layers", "perception_repeat", "eval_every", "fsdp", "grad_ckpt", "autocast"},
}
SCRATCH_FLAGS = {"layers", "width", "ffn", "vit_pos", "vision_steps", "tokenizer"}  # sft without --init only


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--stage", required=True, choices=["sft", "rm", "ppo"])
    p.add_argument("--out", required=True, help="output directory (created; an existing run needs --resume)")
    p.add_argument("--data", help="JSON/JSONL in the official format, or a data.txt mixture (default: the world)")
    p.add_argument("--heldout", help="sft, rm with --data: held-out set to evaluate on (rm: preference pairs; sft: "
                                     "world held-out prompts such as runs/world/heldout_prompts.json)")
    p.add_argument("--init", help="starting checkpoint (default: the world's SFT policy; sft: from scratch)")
    p.add_argument("--rm", nargs="+", help="ppo: reward model dir(s), averaged when several")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--steps", type=data.positive_int, help="optimizer steps (ppo: iterations)")
    p.add_argument("--batch", type=data.positive_int, help="samples (rm: pairs; ppo: prompts) per step, all ranks")
    p.add_argument("--token-budget", type=data.positive_int, help="max padded tokens per micro-batch (memory follows "
                   "this; rm: a pair counts as its longer side, and its two answers run together, so up to twice this)")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--warmup", type=float, default=0.01, help="warmup fraction of the steps, then cosine to 0")
    p.add_argument("--clip", type=float, default=1.0, help="global grad-norm clip")
    p.add_argument("--head", choices=["linear", "mlp"], default="linear", help="rm: IXC's score or BaseReward's")
    p.add_argument("--hd-num", type=data.positive_int, default=9)
    p.add_argument("--train-transform", action="store_true",
                   help="the official training HD transform (1.5x wider grid, centred padding) instead of inference's")
    p.add_argument("--max-length", type=data.positive_int, default=8192)
    p.add_argument("--share-prefix", type=int, default=1, choices=[0, 1],
                   help="rm: run a pair's common image + prompt once for both answers (1) or score each alone (0); "
                   "off under --fsdp and --grad-ckpt")
    p.add_argument("--center-coef", type=float, default=0.0,
                   help="rm: add coef * (r_chosen + r_rejected)^2 per pair (Eisenstein et al. 2023; TRL's "
                        "center_rewards_coefficient, 0.01 recommended there): pins each prompt's free reward offset "
                        "near 0, so one threshold serves every prompt, as clean.py needs. 0: the paper's Eq. 1 alone")
    p.add_argument("--add-layers", type=int, default=0,
                   help="rm: stack this many decoder layers, identity at init (model.add_layers), on the trunk: "
                        "depth after the trunk's own lookups, where checking a value needs it (the world's judge)")
    p.add_argument("--perception-repeat", type=data.positive_int, default=1,
                   help="rm: show each pair whose rejected answer is the policy's own perception error (the world's "
                        "labels: family perception, source policy) this many times per epoch; the errors best-of-N "
                        "and PPO meet are the rarest in the pairs (the world's judge)")
    p.add_argument("--max-len-ratio", type=float, default=2.5,
                   help="rm: drop pairs whose chosen answer is more than this many times longer than the rejected")
    p.add_argument("--freeze-vision", choices=["auto", "yes", "no"], default="auto",
                   help="auto: frozen (ViT + vision_proj) except when sft builds a model from scratch without "
                   "--vision-steps")
    p.add_argument("--layers", type=int, default=WORLD_CONFIG["num_hidden_layers"],
                   help="sft from scratch: decoder layers of the world's tiny model")
    p.add_argument("--width", type=int, default=WORLD_CONFIG["hidden_size"],
                   help="sft from scratch: decoder hidden size (4 heads, 2 KV heads)")
    p.add_argument("--ffn", type=int, default=WORLD_CONFIG["intermediate_size"],
                   help="sft from scratch: SwiGLU intermediate size")
    p.add_argument("--tokenizer", help="sft from scratch: tokenizer.model (default: the world's); a judge that scores "
                   "a policy's PPO rollouts needs the policy's, e.g. checkpoints/world-sft/tokenizer.model")
    p.add_argument("--truth", action="store_true", help="sft on the world: every answer right (the weaker model's "
                   "failures replaced by the correct answers; how checkpoints/world-judge was built)")
    p.add_argument("--vit-pos", type=float, default=4.0,
                   help="sft from scratch: amplitude of the ViT's 2-D sin-cos position table (0: CLIP's N(0, 0.02))")
    p.add_argument("--vision-steps", type=data.positive_int, default=0,
                   help="sft from scratch on the world: first pretrain the ViT and vision_proj this many steps to name "
                   "each cell's colour, shape and place (pretrain_vision; checkpoints/world-judge: 400), then freeze them")
    p.add_argument("--eval-every", type=int, help="held-out evaluation every N steps (0: at the end); ppo: "
                   "the checker on greedy held-out answers beside KL and score, drawn in overoptimisation.svg")
    p.add_argument("--save-every", type=data.positive_int, default=50)
    p.add_argument("--stop-after", type=int, help="save and exit after this many steps in this invocation (job time "
                   "limits); --resume continues")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer "
                   "state across processes (FSDP2) instead of replicating them (DDP), for models that do not fit one GPU")
    p.add_argument("--grad-ckpt", action="store_true", help="recompute each decoder layer's activations in "
                   "backward (the official script's gradient_checkpointing): activation memory for ~1/3 more time")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast of the forward passes over fp32 weights (ppo: the frozen models held in "
                   "bf16 too); auto: on CUDA, off on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-dir", default=str(WORLD_DIR))
    stage_flags = dict(STAGE_FLAGS, ppo={"rm", "eval_every", "fsdp", "grad_ckpt", "autocast"} | ppo.add_args(p))
    a = p.parse_args(argv)
    given = {t[2:].split("=")[0].replace("-", "_") for t in argv if t.startswith("--")}
    unused = sorted(given - SHARED_FLAGS - stage_flags[a.stage] | (given & SCRATCH_FLAGS if a.init else set()))
    if unused:
        p.error(f"--stage {a.stage} does not use " + ", ".join("--" + u.replace("_", "-") for u in unused))
    if a.truth and a.data is not None:
        raise SystemExit("error: --truth rewrites the world's SFT answers; with --data, write the answers you want")
    if a.heldout and a.data is None:
        raise SystemExit("error: --heldout goes with --data in stages sft and rm (the world brings its own held-out set)")
    if a.add_layers < 0:
        raise SystemExit(f"error: --add-layers must be >= 0, got {a.add_layers}")
    if a.center_coef < 0:
        raise SystemExit(f"error: --center-coef must be >= 0 (it penalises a pair's summed reward), got {a.center_coef}")
    if a.vision_steps and a.train_transform:
        raise SystemExit("error: --vision-steps pretrains the tower on the inference HD transform's single crop; with "
                         "--train-transform the frozen tower would read crops it never saw")
    for k, v in (WORLD if a.data is None else RECIPE)[a.stage].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.fsdp or a.grad_ckpt:
        # FSDP2 re-gathers a layer for backward from hooks on the layer's outputs; a shared prefix's keys/values
        # leave a layer without passing through its output, so their backward would find the weights already freed.
        # Checkpointing recomputes a layer in backward, which would append the prefix's keys/values a second time
        a.share_prefix = 0
    return a


# ----------------------------------------------------------------------------------------------------------------
# SFT: teacher-forced next-token loss on the assistant's answers


class SFTObjective(nn.Module):
    """What DDP / FSDP wrap for SFT: forward(samples) -> the sum over samples of each one's mean next-token loss
    over its answer tokens (every answer of a multi-turn sample; data.sft_segments marks them)."""

    def __init__(self, model, hd_num, train_transform=False):
        super().__init__()
        self.model, self.hd_num, self.train_transform = model, hd_num, train_transform

    def forward(self, samples):
        m, seqs, flags = self.model, [], []
        for s in samples:
            segments, f = data.sft_segments(m.tokenizer, s)
            seqs.append((segments, m.load_images(s["images"], self.hd_num, self.train_transform)))
            flags.append(torch.tensor(f, device=m.device))
        batch = m.embed_batch(seqs)
        labels = torch.full_like(batch["ids"], -100)
        for b, f in enumerate(flags):
            text = (batch["ids"][b] != -100).nonzero().squeeze(1)  # text positions in order (images, padding: -100)
            labels[b, text[f]] = batch["ids"][b, text[f]]
        logits = m(batch["embeds"], batch["im_mask"], batch["attention_mask"])
        target = labels[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")
        return (ce.sum(1) / (target != -100).sum(1)).sum()


def sft_model(a, device):
    """--init, or the world's tiny policy from scratch (its ViT positions from a sin-cos table of --vit-pos)."""
    if a.init:
        return InternLMXComposer2.from_pretrained(a.init, device=device)
    tok = data.Tokenizer(a.tokenizer or store.ensure_world(a.world_dir)["sft_train"].parent / "tokenizer.model")
    shape = dict(num_hidden_layers=a.layers, hidden_size=a.width, intermediate_size=a.ffn)
    model = init_weights(InternLMXComposer2(Config(**{**WORLD_CONFIG, **shape}, vocab_size=tok.vocab_size)), a.seed)
    if a.vit_pos:
        table = model.vit.vision_tower.vision_model.embeddings.position_embedding.weight
        with torch.no_grad():
            table.copy_(sincos_position_embedding(model.cfg.vision.grid, model.cfg.vision.hidden_size, a.vit_pos))
    model.tokenizer = tok
    model.to(device)
    if a.vision_steps and not a.resume:  # a resumed run loads its tower
        acc = pretrain_vision(model, a.vision_steps, a.seed)
        print(f"pretrained the vision tower {a.vision_steps} steps: per-cell accuracy on its last batch " +
              ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), file=sys.stderr)
    return model


def pretrain_vision(model, steps, seed, batch=32, lr=1e-3):
    """The world's stand-in for the CLIP pretraining IXC-2.5's ViT comes with: ViT and vision_proj learn to name each
    cell's colour, shape and place from its merged token of the local view (linear heads, dropped after), on freshly
    drawn training layouts. Trained through the LM loss alone, a tower's tokens carry colour many times more
    strongly than shape and lose their cell, and the decoder then cannot find the object a question names (README:
    the judge). Under torch.distributed every rank runs it and takes rank 0's tower, which FSDP would not broadcast.
    Returns the heads' accuracy on the last batch (colour and shape: on the cells that hold an object)."""
    g, d = GRID, model.cfg.hidden_size
    heads = init_weights(nn.ModuleDict({"colour": nn.Linear(d, 1 + len(COLOURS)),
                                        "shape": nn.Linear(d, 1 + len(SHAPES)),
                                        "cell": nn.Linear(d, g * g)}), seed).to(model.device)
    tower = [*model.vit.parameters(), *model.vision_proj.parameters()]
    opt = torch.optim.AdamW([*tower, *heads.parameters()], lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 11])
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        layouts = [scene.sample_objects(rng) for _ in range(batch)]
        pixels = [to_pixels(hd_transform(scene.draw(objs), 1, crop=IMG)) for objs in layouts]
        colour, shape = (torch.tensor(x, device=model.device) for x in zip(*map(scene.cell_labels, layouts)))
        tokens = torch.stack([scene.cell_tokens(t) for t in model.encode_images(pixels)])
        target = {"colour": colour, "shape": shape, "cell": torch.arange(g * g, device=model.device).expand(batch, -1)}
        logits = {k: heads[k](tokens) for k in heads}
        loss = sum(F.cross_entropy(logits[k].flatten(0, 1), target[k].flatten()) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if torch.distributed.is_initialized():
        for p in tower:
            torch.distributed.broadcast(p.data, 0)
    with torch.no_grad():
        hit = {k: logits[k].argmax(-1) == target[k] for k in heads}
        return {"colour": hit["colour"][shape > 0].float().mean().item(),
                "shape": hit["shape"][shape > 0].float().mean().item(), "cell": hit["cell"].float().mean().item()}


def sft_data(a):
    """(samples, held-out world prompts). The world's SFT set opens with its single-object images (curriculum)."""
    if a.data:
        path = Path(a.data)
        rows = data.read_mixture(path, a.seed, data.read_sft) if path.suffix == ".txt" else data.read_sft(path)
        return rows, store.heldout_items(a.heldout) if a.heldout else []
    files = store.ensure_world(a.world_dir)
    easy = [dict(s, warmup=True) for s in data.read_sft(files["sft_easy"])]
    rows = easy + data.read_sft(files["sft_train"])
    if a.truth:
        rows = weaker.truthful(rows, json.loads(Path(files["sft_errors"]).read_text()))
    return rows, store.heldout_items(files["heldout_prompts"])


def train_sft(a, rank, n_proc, device):
    out = common.prepare_out(a.out, a.resume, rank)
    model = sft_model(a, device)
    model.model.gradient_checkpointing = a.grad_ckpt
    freeze_vision(model, a.freeze_vision == "yes" or (a.freeze_vision == "auto" and (a.init or a.vision_steps)))
    samples, held = sft_data(a)
    lengths = [sample_length(model.tokenizer, s, model.cfg.vision.image_size, model.cfg.vision.grid, a.hd_num)
               for s in samples]
    fwd = common.wrap(SFTObjective(model, a.hd_num, a.train_transform), n_proc, a.fsdp)
    opt = common.make_optimizer(model, a.lr, a.weight_decay, a.beta2)
    amp = common.autocast(device, a.autocast)
    run = Run(a, out, rank, n_proc, model, opt, ["loss", "grad_norm", "lr", "heldout_accuracy"], "SFT")

    def evaluate():  # FSDP: every rank generates, so that the layers' all-gathers pair up
        if not held or not (rank == 0 or a.fsdp):
            return {}
        with common.root_gathered(fwd), amp():
            result = checker.eval_policy(model, held, a.hd_num)
        return {"heldout_" + k: v for k, v in result.items()}

    per_epoch = max(1, len(samples) // a.batch)

    @functools.lru_cache(maxsize=1)
    def epoch_order(epoch):  # a fresh order per epoch, the same on every rank
        order = list(range(len(samples)))
        random.Random(a.seed + epoch).shuffle(order)
        if epoch == 0:  # the first epoch opens with the warm-up samples, each group still shuffled
            order.sort(key=lambda i: not samples[i].get("warmup"))
        return order

    while run.step < a.steps:
        mine, micro = run.share(epoch_order(run.step // per_epoch), per_epoch, lengths, device)
        model.train()
        loss_total = 0.0
        for k, mb in enumerate(micro):
            with common.no_sync_unless(k == len(micro) - 1, fwd), amp():
                loss = fwd([samples[mine[i]] for i in mb])
                (loss * n_proc / a.batch).backward()  # DDP and FSDP average over ranks: the global mean
            loss_total += loss.item()
        run.end_step(loss_total, [[lengths[mine[i]] for i in mb] for mb in micro], evaluate)
        if run.stopped:
            return None
    return run.finish(evaluate())


def freeze_vision(model, frozen):
    """The paper freezes the vision encoder and projector (a world policy built from scratch trains them)."""
    for p in [*model.vit.parameters(), *model.vision_proj.parameters()]:
        p.requires_grad_(not frozen)


# ----------------------------------------------------------------------------------------------------------------
# RM: the Bradley-Terry loss on (chosen, rejected) pairs


def bt_loss(chosen, rejected, center_coef=0.0):
    """Paper Eq. 1: -log sigmoid(r(x, y_w) - r(x, y_l)), summed over pairs (the caller divides by the batch).
    Eq. 1 sees only differences, so each prompt keeps a free offset that pairs never fix but an absolute score (a
    cleaning threshold) reads; `center_coef` adds the centering term (r(x, y_w) + r(x, y_l))^2 that pulls it to 0."""
    return -F.logsigmoid(chosen - rejected).sum() + center_coef * ((chosen + rejected) ** 2).sum()


class PairRewards(nn.Module):
    """What DDP / FSDP wrap for the RM: forward(pairs) -> (chosen rewards, rejected rewards), both in one forward
    (the official interleave c0, r0, c1, r1, ...), a pair's shared image and prompt run once when `share_prefix`
    (RewardModel.pair_rewards: the same numbers as scoring each alone)."""

    def __init__(self, rm, hd_num, train_transform, max_length, share_prefix):
        super().__init__()
        self.model, self.hd_num, self.train_transform = rm, hd_num, train_transform
        self.max_length, self.share_prefix = max_length, share_prefix

    def forward(self, pairs):
        seqs = [self.model.sequence(data.reward_template(conv), p["images"], self.hd_num, self.train_transform)
                for p in pairs for conv in (p["chosen"], p["rejected"])]
        score = self.model.pair_rewards if self.share_prefix else self.model.rewards_alone
        r = score(seqs, self.max_length)
        return r[0::2], r[1::2]


def rm_data(a, rank):
    """(pairs, held-out pairs), filtered by check_data and the paper's length constraint."""
    if a.data:
        path = Path(a.data)
        pairs = data.read_mixture(path, a.seed) if path.suffix == ".txt" else data.read_preference(path)
        held = data.read_preference(a.heldout) if a.heldout else []
    else:
        files = store.ensure_world(a.world_dir)
        pairs, held = data.read_preference(files["pref_train"]), data.read_preference(files["pref_heldout"])
    kept = [p for p in pairs if data.check_data(p["chosen"]) and data.check_data(p["rejected"])]
    pairs_kept = [p for p in kept if data.length_ok(p, a.max_len_ratio)]
    common.log(rank, f"data: {len(pairs_kept)} pairs kept; check_data dropped {len(pairs) - len(kept)}, length "
                     f"constraint (chosen <= {a.max_len_ratio} x rejected) dropped {len(kept) - len(pairs_kept)}")
    if a.perception_repeat > 1:
        own = [p for p in pairs_kept if p["family"] == "perception" and p["source"] == "policy"]
        if not own:
            raise SystemExit(f"error: --perception-repeat: no pair of {a.data or files['pref_train']} has family "
                             f"'perception' and source 'policy' (the world's labels of the policy's own errors)")
        pairs_kept += own * (a.perception_repeat - 1)   # spread through each epoch by its shuffle
        common.log(rank, f"data: the policy's {len(own)} perception errors shown {a.perception_repeat} times: "
                         f"{len(pairs_kept)} pairs per epoch")
    return pairs_kept, held


@torch.no_grad()
def eval_rm(objective, pairs, batch=32):
    """Held-out accuracy (chosen scored above rejected), overall, per rejection kind, per failure family (the
    world's pairs) and per question kind of the wrong-value pairs."""
    objective.eval()
    chosen, rejected = [], []
    for s in range(0, len(pairs), batch):
        c, r = objective(pairs[s:s + batch])
        chosen += c.tolist()
        rejected += r.tolist()
    ok = [c > r for c, r in zip(chosen, rejected)]
    by_kind, by_family, by_question = {}, {}, {}
    for p, o in zip(pairs, ok):
        by_kind.setdefault(p["kind"] or "all", []).append(o)
        if p.get("family"):
            by_family.setdefault(p["family"], []).append(o)
        if p["kind"] == "wrong_value" and p.get("question_kind"):   # the pairs that need the image (or the sum)
            by_question.setdefault(p["question_kind"], []).append(o)
    allr = torch.tensor(chosen + rejected)
    return {"heldout_accuracy": sum(ok) / len(ok),
            "heldout_accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "heldout_accuracy_by_family": {k: sum(v) / len(v) for k, v in sorted(by_family.items())},
            "wrong_value_accuracy_by_question_kind": {k: sum(v) / len(v) for k, v in sorted(by_question.items())},
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(ok),
            "reward_mean": allr.mean().item(), "reward_std": allr.std().item()}


def blank_image_check(objective, held):
    """Does the reward model use the image? The held-out perception pairs (the world's, which need the image)
    scored with each image as it is and replaced by a blank one of its size: with the image they should be
    judged better than chance, blank at chance."""
    from PIL import Image
    need = [p for p in held if p.get("family") == "perception" and p["images"]]
    if not need:
        return {}
    with tempfile.TemporaryDirectory() as tmp:   # this process's own files: ranks may all run this
        def blank(path):
            with Image.open(path) as f:
                w, h = f.size
            name = Path(tmp) / f"blank_{w}x{h}.png"
            if not name.exists():
                Image.new("RGB", (w, h), "white").save(name)
            return str(name)
        blanked = [dict(p, images=[blank(im) for im in p["images"]]) for p in need]
        return {"image_check": {"pairs": len(need), "accuracy_with_image": eval_rm(objective, need)["heldout_accuracy"],
                                "accuracy_blank_image": eval_rm(objective, blanked)["heldout_accuracy"]}}


def train_rm(a, rank, n_proc, device):
    out = common.prepare_out(a.out, a.resume, rank)
    rm = RewardModel.from_pretrained(a.init or WORLD_SFT, device=device, seed=a.seed,
                                     head={"linear": "score", "mlp": "score_mlp"}[a.head])
    add_layers(rm, a.add_layers, a.seed)   # before resume, which loads them
    rm.model.gradient_checkpointing = a.grad_ckpt
    freeze_vision(rm, a.freeze_vision != "no")
    pairs, held = rm_data(a, rank)
    lengths = [sample_length(rm.tokenizer, p, rm.cfg.vision.image_size, rm.cfg.vision.grid, a.hd_num) for p in pairs]
    objective = PairRewards(rm, a.hd_num, a.train_transform, a.max_length, a.share_prefix)
    fwd = common.wrap(objective, n_proc, a.fsdp)  # under FSDP2 the same module, sharded in place
    opt = common.make_optimizer(rm, a.lr, a.weight_decay, a.beta2)
    amp = common.autocast(device, a.autocast)
    run = Run(a, out, rank, n_proc, rm, opt, ["loss", "accuracy", "grad_norm", "heldout_accuracy"], "reward model")

    def evaluate(final=False):  # DDP: rank 0 alone, unwrapped; FSDP: every rank, so that the all-gathers pair up
        if not held or not (rank == 0 or a.fsdp):
            return {}
        with amp():
            result = eval_rm(objective, held)
            if final:
                result.update(blank_image_check(objective, held))
        if a.fsdp and n_proc > 1:
            fwd.reshard()  # FSDP2 leaves the root gathered after a forward, for a backward that is not coming
        return result

    per_epoch = max(1, len(pairs) // a.batch)
    # the official stream, image, image, text, ...: every step holds both kinds, 2:1, in a fresh order per epoch
    epoch_order = functools.lru_cache(maxsize=1)(
        lambda epoch: data.mix_image_text([bool(p["images"]) for p in pairs], a.seed + epoch))
    while run.step < a.steps:
        mine, micro = run.share(epoch_order(run.step // per_epoch), per_epoch, lengths, device)
        fwd.train()
        loss_total, n_correct = 0.0, 0
        for k, mb in enumerate(micro):
            with common.no_sync_unless(k == len(micro) - 1, fwd), amp():
                chosen, rejected = fwd([pairs[mine[i]] for i in mb])
                loss = bt_loss(chosen, rejected, a.center_coef)  # Eq. 1 (+ centring: the logged loss too)
                (loss * n_proc / a.batch).backward()  # DDP and FSDP average over ranks: the global mean
            loss_total += loss.item()
            n_correct += (chosen > rejected).sum().item()
        # a pair's two answers both run: twice its (longer side's) tokens
        run.end_step(loss_total, [[2 * lengths[mine[i]] for i in mb] for mb in micro], evaluate,
                     accuracy=n_correct / len(mine))
        if run.stopped:
            return None
    summary = run.finish(evaluate(final=True))
    if "reward_mean" in summary:  # the held-out reward statistics PPO normalises with
        rm.cfg.reward_mean, rm.cfg.reward_std = summary["reward_mean"], summary["reward_std"]
        weights = {k: common.to_cpu(v, rank == 0) for k, v in rm.state_dict().items()}
        if rank == 0:
            rm.save_pretrained(out, metadata={"step": run.step}, state=weights)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The bookkeeping both loops share, after the step's backward passes


class Run:
    """Optimizer step, metrics line, curves, checkpoints, evaluation and --stop-after for the sft and rm loops;
    resumes from --out when asked. FSDP: every rank gathers its shards for a checkpoint, rank 0 writes."""

    def __init__(self, a, out, rank, n_proc, model, opt, curve_keys, title):
        self.a, self.out, self.rank, self.n_proc, self.model, self.opt = a, out, rank, n_proc, model, opt
        self.curve_keys, self.title, self.step, self.stopped, self.saved_step = curve_keys, title, 0, False, None
        if a.resume:
            self.step = self.saved_step = common.load_checkpoint(out, model, opt)
            common.log(rank, f"resumed {out} at step {self.step}")
            if rank == 0:
                common.trim_metrics(out / "metrics.jsonl", self.step)
        self.first_step, self.t0, self.tokens, self.pads = self.step, time.time(), 0, []
        trainable = [p for p in model.parameters() if p.requires_grad]
        common.log(rank, f"{a.stage}: {a.steps} steps of {a.batch}, {n_proc} process(es), {sum(p.numel() for p in trainable) / 1e6:.2f}M "
                         f"trainable of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")

    def share(self, order, per_epoch, lengths, device):
        """This rank's samples of the current step (indices into `order`'s dataset) and their micro-batches. A step
        is a random draw from the epoch's order; inside it, samples sorted by length pack into micro-batches of at
        most --token-budget padded tokens."""
        a, at = self.a, (self.step % per_epoch) * self.a.batch
        mine = sorted(order[at:at + a.batch], key=lambda i: lengths[i])[self.rank::self.n_proc]
        return mine, common.micro_batches([lengths[i] for i in mine], a.token_budget, self.n_proc, a.fsdp, device)

    def save(self):
        if self.rank == 0 or (self.a.fsdp and self.n_proc > 1):
            common.save_checkpoint(self.out, self.model, self.opt, self.step, write=self.rank == 0)
        self.saved_step = self.step

    def end_step(self, loss_total, micro_lengths, evaluate, **extra):
        """After a step's backward passes; `micro_lengths` are the tokens of each micro-batch's samples."""
        a, step = self.a, self.step
        if not torch.isfinite(torch.tensor(loss_total)):
            last = f"the last good checkpoint is {self.out} (step {self.saved_step})" if self.saved_step is not None \
                else "no checkpoint was written yet"
            raise SystemExit(f"error: loss is {loss_total} at step {step + 1}; stopping without saving; {last}")
        lr = common.lr_at(step, a.lr, a.steps, a.warmup)
        common.set_lr(self.opt, lr)
        grad_norm = common.clip_and_step([p for p in self.model.parameters() if p.requires_grad], self.opt, a.clip)
        self.step = step = step + 1
        real, padded = sum(map(sum, micro_lengths)), sum(max(mb) * len(mb) for mb in micro_lengths)
        self.tokens += real
        self.pads = (self.pads + [(real, padded)])[-10:]
        rec = {"step": step, "loss": loss_total / sum(map(len, micro_lengths)), **extra, "grad_norm": grad_norm,
               "lr": lr, "padding_waste": 1 - sum(r for r, _ in self.pads) / sum(p for _, p in self.pads),
               "tokens_per_s": self.tokens * self.n_proc / (time.time() - self.t0)}
        if self.rank == 0 and (step % 10 == 0 or step == a.steps):
            eta = (time.time() - self.t0) / (step - self.first_step) * (a.steps - step)
            print(f"step {step}/{a.steps} " + " ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "step")
                  + f" eta {eta:.0f}s", flush=True)
            common.append_jsonl(self.out / "metrics.jsonl", rec)
        if step % a.save_every == 0 or step == a.steps:
            self.save()
        if a.eval_every and step % a.eval_every == 0 and step < a.steps:
            metrics = evaluate()
            if self.rank == 0 and metrics:
                common.append_jsonl(self.out / "metrics.jsonl", {"step": step, **metrics})
        if a.stop_after and step - self.first_step >= a.stop_after and step < a.steps:
            self.save()
            common.log(self.rank, f"stopped after {a.stop_after} steps at step {step}; continue with --resume")
            self.stopped = True

    def finish(self, metrics):
        summary = {"stage": self.a.stage, "steps": self.step, "seconds": round(time.time() - self.t0, 1),
                   "matmul_gflops": common.matmul_gflops(), "processes": self.n_proc,
                   "command": " ".join(sys.argv), "seed": self.a.seed, **metrics}
        if self.rank == 0:
            common.write_curves(self.out, self.curve_keys, f"{self.title}: {self.out.name}")
            data.atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
            print(json.dumps(summary, indent=2))
        return summary


def main(argv=None):
    a = parse_args(argv)
    rank, n_proc, device = common.setup_distributed()
    if a.batch < n_proc:  # a rank with no sample would never join the step's all-reduce
        raise SystemExit(f"error: --batch {a.batch} is smaller than the {n_proc} processes; each needs a sample")
    if (a.stage == "ppo" or (a.fsdp and n_proc > 1)) and a.batch % n_proc:
        # equal shares: every rank runs as many collective forwards
        raise SystemExit(f"error: --batch {a.batch} must be a multiple of the {n_proc} processes here")
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    result = {"sft": train_sft, "rm": train_rm, "ppo": ppo.train}[a.stage](a, rank, n_proc, device)
    common.teardown_distributed(n_proc)
    return result


if __name__ == "__main__":
    data.run_cli(main)
