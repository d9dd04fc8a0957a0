"""The launcher: `--stage sft` fine-tunes the chat policy, `--stage rm` trains the reward model (paper Eq. 1),
`--stage ppo` runs PPO (ppo.py). One process, or torchrun with DDP (FSDP2 with --fsdp).

    torchrun --standalone --nproc_per_node 2 train.py --stage rm      # the built-in world, 2 CPU processes
    torchrun --standalone --nproc_per_node 2 train.py --stage ppo     # PPO against the reward model in runs/rm
    torchrun --nproc_per_node 8 train.py --stage rm --init internlm-xcomposer2d5-7b \\
        --data data.txt --fsdp --grad-ckpt --out runs/rm7b             # the official recipe, on GPUs

With --data a stage runs the official recipe (train.py's RECIPE); without it, the built-in world (the world
package) with the world's overrides (train.py's WORLD), starting from the world's SFT policy in checkpoints/world-sft,
as the paper starts from IXC-2.5. `python train.py --stage rm --help` lists the flags a stage reads and their
defaults. Outputs in --out (default runs/<stage>): config.json + model.safetensors (+ tokenizer.model) loadable by
from_pretrained, resume.safetensors (model, optimizer, RNG, step) for --resume, metrics.jsonl, curves.svg and
summary.json. Every file is written to a temporary name and renamed.
"""
import argparse
import functools
import random
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import batching
import common
import data
import ppo
from world import ROOT, WORLD_DIR, WORLD_SFT, checker, store
from model import InternLMXComposer2
from reward import DEFAULT_RM, RewardModel
from vision import sample_length

# Every setting a stage reads, with --data: the official recipe (script_train.sh: AdamW lr 1e-5, weight decay 0.1,
# beta2 0.95, 1% warm-up then cosine to 0, clip 1.0, hd_num 9, max_length 8192; PPO: TRL's, the rest in ppo.add_args)
# and the paper's length constraint. Settings without a flag (OPTIM, max_length, max_len_ratio) are edited here.
OPTIM = dict(weight_decay=0.1, beta2=0.95, warmup=0.01, clip=1.0, hd_num=9)
RECIPE = {"sft": dict(OPTIM, lr=1e-5, steps=1000, batch=32, token_budget=4096, eval_every=0),
          "rm": dict(OPTIM, lr=1e-5, steps=1000, batch=16, token_budget=8192, eval_every=0, head="linear",
                     share_prefix=1, center_coef=0.0, perception_repeat=1, max_length=8192, max_len_ratio=2.5),
          "ppo": dict(OPTIM, lr=1e-6, steps=100, batch=16, token_budget=4096, eval_every=0, kl_coef=0.05)}
# The built-in world's overrides, without --data: a tiny model on a small world takes larger steps
WORLD = {"sft": dict(lr=1e-3, steps=6000, batch=32, token_budget=1024),
         "rm": dict(lr=3e-4, steps=750, batch=32, token_budget=2048),
         "ppo": dict(lr=1e-4, steps=120, batch=48, eval_every=20, kl_coef=0.1)}


def stage_parser(stage, settings):
    """The flags `stage` reads, its `settings` as their defaults: a flag another stage reads does not exist here."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter, allow_abbrev=False)
    p.add_argument("--stage", required=True, choices=list(RECIPE), help="sft, rm (Eq. 1) or ppo (Eq. 2-4)")
    p.add_argument("--out", default=f"runs/{stage}", help="output directory (an existing run needs --resume)")
    p.add_argument("--data", help={
        "sft": "SFT conversations (JSON/JSONL in the official format) or a data.txt mixture of such files",
        "rm": "preference pairs (JSON/JSONL in the official format) or a data.txt mixture of such files",
        "ppo": "prompts: SFT conversations (JSON/JSONL in the official format); each one's last answer is dropped "
               "and PPO answers its question"}[stage]
        + "; switches the defaults to the official recipe (default: none, the built-in world)")
    p.add_argument("--init", help=("the trunk the reward model starts from, its score head new" if stage == "rm" else
                                   "the policy to start from") + f" (default: {rel(WORLD_SFT)}, the world's SFT "
                   "policy, also with --data)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--steps", type=data.positive_int, help="PPO iterations: each samples a rollout of --batch prompts, "
                   "then takes --ppo-epochs x --mini-batches optimizer steps" if stage == "ppo" else "optimizer steps")
    step = "iteration" if stage == "ppo" else "step"
    p.add_argument("--batch", type=data.positive_int, help={"sft": "samples", "rm": "pairs", "ppo": "responses (rloo: "
                   "batch / k prompts, k samples each)"}[stage] + f" per {step}, all processes together")
    p.add_argument("--token-budget", type=data.positive_int, help="max padded tokens per micro-batch, rows x the "
                   "widest row as built (memory follows this)" + {"sft": "", "rm": "; a pair is two rows as wide as its "
                   "longer side", "ppo": "; a row is as wide as the longest prompt plus the longest response"}[stage])
    p.add_argument("--prefetch", type=int, default=2, help="micro-batches prepared ahead on a background thread "
                   "(image decode, HD tiling, tokenisation; 0: inline, the same batches and weights)")
    p.add_argument("--lr", type=float, help="peak learning rate (warm-up, then cosine to 0)")
    p.add_argument("--eval-every", type=int, help=f"held-out evaluation every N {step}s" + (
        " (0: before and after only): the checker on greedy held-out answers, beside KL and score; the world's "
        "held-out prompts only" if stage == "ppo" else " (0: at the end)"))
    p.add_argument("--save-every", type=data.positive_int, default=50, help=f"checkpoint every N {step}s")
    p.add_argument("--stop-after", type=int, help=f"save and exit after this many {step}s in this invocation (job "
                   "time limits); --resume continues (default: none, run to --steps)")
    p.add_argument("--seed", type=int, default=0, help={"sft": "data order", "rm": "data order and the score head's "
                   "initialisation", "ppo": "the prompts drawn and the responses sampled"}[stage])
    p.add_argument("--world-dir", default=str(WORLD_DIR), help="the built-in world's files, made on first use "
                   f"(default: {rel(WORLD_DIR)} in the repository)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer state "
                   "across processes (FSDP2) instead of replicating them (DDP)")
    p.add_argument("--grad-ckpt", action="store_true", help="recompute each decoder layer's activations in backward "
                   "(the official script's gradient_checkpointing): activation memory for ~1/3 more time")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto", help="bf16 autocast of the forward "
                   "passes over fp32 weights" + " (the frozen models held in bf16 too)" * (stage == "ppo") +
                   "; auto: on CUDA, off on CPU")
    if stage in ("sft", "rm"):
        p.add_argument("--heldout", help="with --data: held-out set to evaluate on (" + {
            "sft": "world held-out prompts such as runs/world/heldout_prompts.json", "rm": "preference pairs"}[stage]
            + ") (default: none with --data; the world brings its own)")
        p.add_argument("--train-transform", action="store_true", help="the official training HD transform (a crop grid "
                       "up to 1.5x as wide as the inference transform's, centred padding) instead of inference's")
        p.add_argument("--freeze-vision", choices=["yes", "no"], default="yes",
                       help="the ViT and vision_proj frozen (yes: the paper's setting) or trained (no)")
    if stage == "rm":
        p.add_argument("--head", choices=["linear", "mlp"], help="IXC's score head (one linear layer) or an MLP head "
                       "(linear, SiLU, linear), as BaseReward's reward models use")
        p.add_argument("--share-prefix", type=int, choices=[0, 1], help="score each sequence alone (0), or run a "
                       "pair's common image + prompt once for both answers (1: the same rewards, less compute); off "
                       "under --fsdp and --grad-ckpt")
        p.add_argument("--center-coef", type=float, help="add coef * (r_chosen + r_rejected)^2 per pair (Eisenstein "
                       "et al. 2023; TRL's center_rewards_coefficient, 0.01 there): pins each prompt's free reward "
                       "offset near 0, so one threshold serves every prompt, as clean.py needs. 0: Eq. 1 alone")
        p.add_argument("--perception-repeat", type=data.positive_int, help="show each pair whose rejected answer is "
                       "the policy's own perception error (the world's labels: family perception, source policy) this "
                       "many times per epoch: the errors best-of-N and PPO meet are the rarest in the pairs")
    if stage == "ppo":
        p.add_argument("--rm", nargs="+", help=f"reward model dir(s), averaged when several (default: {DEFAULT_RM} on "
                       "the built-in world; required with --data)")
        ppo.add_args(p)
    p.set_defaults(**settings)
    for action in p._actions:   # a default the world overrides: both, so that --help reads the same with --data
        k = action.dest
        if k in WORLD[stage] and WORLD[stage][k] != RECIPE[stage].get(k) and "default" not in action.help:
            action.help += f" (default: {WORLD[stage][k]} on the built-in world, {RECIPE[stage][k]} with --data)"
    return p


def rel(path):
    """`path` as the help prints it: relative to the repository when inside it."""
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def parse_args(argv=None):
    """--stage first, then the parser of that stage with its defaults: the official recipe with --data, the world's
    overrides without it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--stage", choices=list(RECIPE))
    pre.add_argument("--data")
    first, _ = pre.parse_known_args(argv)
    if first.stage is None:  # --help or a missing --stage: the stages and the docstring
        p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter, allow_abbrev=False)
        p.add_argument("--stage", required=True, choices=list(RECIPE), help="then --help lists the stage's flags")
        p.parse_args(argv)
    p = stage_parser(first.stage, {**RECIPE[first.stage], **(WORLD[first.stage] if first.data is None else {})})
    a, unknown = p.parse_known_args(argv)
    if unknown:
        p.error(f"--stage {a.stage} does not use {' '.join(unknown)} (--stage {a.stage} --help lists what it does)")
    if getattr(a, "heldout", None) and a.data is None:
        raise SystemExit("error: --heldout goes with --data in stages sft and rm (the world brings its own held-out "
                         "set)")
    if a.stage == "rm" and a.center_coef < 0:
        raise SystemExit(f"error: --center-coef must be >= 0 (it penalises a pair's summed reward), got "
                         f"{a.center_coef}")
    if a.stage == "rm" and (a.fsdp or a.grad_ckpt):
        a.share_prefix = 0   # a shared prefix breaks FSDP2's and checkpointing's backward: docs/scale.md
    if a.stage == "ppo" and a.rm is None and a.data is None:
        if not (Path(DEFAULT_RM) / "config.json").is_file():
            raise SystemExit(f"error: no reward model in {DEFAULT_RM}; train it first: torchrun --standalone "
                             f"--nproc_per_node 2 train.py --stage rm (or name one with --rm DIR)")
        a.rm = [DEFAULT_RM]
    return a


# ----------------------------------------------------------------------------------------------------------------
# SFT: teacher-forced next-token loss on the assistant's answers


class SFTObjective(nn.Module):
    """What DDP / FSDP wrap for SFT: forward(prepared samples) -> the sum over samples of each one's mean next-token
    loss over its answer tokens (every answer of a multi-turn sample; data.sft_segments marks them). `prepare` is
    the host's part (tokens, decoded and tiled images), run ahead of the device by batching.Prefetcher."""

    def __init__(self, model, hd_num, train_transform=False):
        super().__init__()
        self.model, self.hd_num, self.train_transform = model, hd_num, train_transform

    def prepare(self, samples):
        m, seqs, flags = self.model, [], []
        for s in samples:
            segments, f = data.sft_segments(m.tokenizer, s)
            pixels = m.load_images(s["images"], self.hd_num, self.train_transform)
            seqs.append((segments, batching.pin(pixels, m.device)))
            flags.append(torch.tensor(f))
        return seqs, flags

    def forward(self, prepared):
        m, (seqs, flags) = self.model, prepared
        batch = m.embed_batch(seqs)
        labels = torch.full_like(batch["ids"], -100)
        for b, f in enumerate(flags):
            text = (batch["ids"][b] != -100).nonzero().squeeze(1)  # text positions in order (images, padding: -100)
            answer = text[f.to(m.device)]
            labels[b, answer] = batch["ids"][b, answer]
        logits = m(batch["embeds"], batch["im_mask"], batch["attention_mask"])
        target = labels[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")
        return (ce.sum(1) / (target != -100).sum(1)).sum()


def sft_data(a):
    """(samples, held-out world prompts). The world's SFT set opens with its single-object images (curriculum); a
    --data file does the same with the rows it marks `"warmup": true`."""
    if a.data:
        path = Path(a.data)
        rows = data.read_mixture(path, a.seed, data.read_sft) if path.suffix == ".txt" else data.read_sft(path)
        return rows, store.heldout_items(a.heldout) if a.heldout else []
    files = store.ensure_world(a.world_dir)
    easy = [dict(s, warmup=True) for s in data.read_sft(files["sft_easy"])]
    return easy + data.read_sft(files["sft_train"]), store.heldout_items(files["heldout_prompts"])


def sft_order(samples, seed, epoch):
    """A fresh order per epoch, the same on every rank; the first epoch opens with the warm-up samples, each group
    still shuffled."""
    order = list(range(len(samples)))
    random.Random(seed + epoch).shuffle(order)
    if epoch == 0:
        order.sort(key=lambda i: not samples[i].get("warmup"))
    return order


def train_sft(a, rank, n_proc, device):
    out = common.prepare_out(a.out, a.resume, rank)
    model = InternLMXComposer2.from_pretrained(a.init or WORLD_SFT, device=device)
    model.model.gradient_checkpointing = a.grad_ckpt
    freeze_vision(model, a.freeze_vision != "no")
    samples, held = sft_data(a)
    lengths = [sample_length(model.tokenizer, s, model.cfg.vision.image_size, model.cfg.vision.grid, a.hd_num)
               for s in samples]
    objective = SFTObjective(model, a.hd_num, a.train_transform)
    fwd, fwd_prepare = common.wrap(objective, n_proc, a.fsdp), objective.prepare
    opt = common.make_optimizer(model, a.lr, a.weight_decay, a.beta2)
    amp = common.autocast(device, a.autocast)
    run = common.Run(a, out, rank, n_proc, model, opt, ["loss", "grad_norm", "lr", "heldout_accuracy"], "SFT")
    trainable = [p for p in model.parameters() if p.requires_grad]

    def evaluate():  # FSDP: every rank generates, so that the layers' all-gathers pair up
        if not held or not (rank == 0 or a.fsdp):
            return {}
        with common.root_gathered(fwd), amp():
            result = checker.eval_policy(model, held, a.hd_num)
        return {"heldout_" + k: v for k, v in result.items()}

    per_epoch = max(1, len(samples) // a.batch)
    epoch_order = functools.lru_cache(maxsize=1)(lambda epoch: sft_order(samples, a.seed, epoch))
    while run.step < a.steps:
        mine, micro = run.share(epoch_order(run.step // per_epoch), per_epoch, lengths, device)
        model.train()
        loss_total = 0.0
        prepared = batching.Prefetcher(lambda mb: fwd_prepare([samples[mine[i]] for i in mb]), micro, a.prefetch)
        for k, batch in enumerate(prepared):
            with common.no_sync_unless(k == len(micro) - 1, fwd), amp():
                loss = fwd(batch)
                (loss * n_proc / a.batch).backward()  # DDP and FSDP average over ranks: the global mean
            loss_total += loss.item()
        run.stop_if_not_finite(loss_total)
        lr = common.lr_at(run.step, a.lr, a.steps, a.warmup)
        common.set_lr(opt, lr)
        grad_norm = common.clip_and_step(trainable, opt, a.clip)
        run.step += 1
        run.log_step(loss_total, [[lengths[mine[i]] for i in mb] for mb in micro], grad_norm, lr)
        if run.save_evaluate_or_stop(evaluate):
            return None
    return run.finish(evaluate())


def freeze_vision(model, frozen):
    """The paper freezes the vision encoder and projector."""
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
    """What DDP / FSDP wrap for the RM: forward(pairs) -> (r(x, y_w) chosen, r(x, y_l) rejected), both in one
    forward (the official interleave c0, r0, c1, r1, ...). Each conversation becomes a sequence of segments, token
    id lists with an int where an image's tokens go (the image's index), and its reward is the score head read at
    the last token (RewardModel.rewards_alone). `share_prefix` computes the same rewards faster: a pair's common
    image and prompt run once and both answers continue from its keys/values (RewardModel.pair_rewards)."""

    def __init__(self, rm, hd_num, train_transform, max_length, share_prefix):
        super().__init__()
        self.model, self.hd_num, self.train_transform = rm, hd_num, train_transform
        self.max_length, self.share_prefix = max_length, share_prefix

    def prepare(self, pairs):
        """The host's part, run ahead of the device by batching.Prefetcher: tokens, decoded and tiled images."""
        return [(segments, batching.pin(pixels, self.model.device)) for segments, pixels in
                (self.model.sequence(data.reward_template(conv), p["images"], self.hd_num, self.train_transform)
                 for p in pairs for conv in (p["chosen"], p["rejected"]))]

    def forward(self, seqs):
        if not self.share_prefix:
            r = self.model.rewards_alone(seqs, self.max_length)
        else:  # the same rewards and gradients, less compute (tests/test_train.py compares them)
            r = self.model.pair_rewards(seqs, self.max_length)
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


# a pair's two answers run together: its padded width is twice its longer side's, so the batcher's per-forward cost
# (32 tokens, batching.token_budget_batches) counts twice too: 2 x 32 keeps the cuts those of the pair's own length
PAIR_OVERHEAD = 64


def pair_widths(rm, pairs, hd_num):
    return [2 * sample_length(rm.tokenizer, p, rm.cfg.vision.image_size, rm.cfg.vision.grid, hd_num) for p in pairs]


@torch.no_grad()
def eval_rm(objective, pairs, token_budget=8192, hd_num=9):
    """Held-out accuracy (chosen scored above rejected), overall, per rejection kind, per failure family (the
    world's pairs) and per question kind of the wrong-value pairs; scored in micro-batches of the token budget."""
    objective.eval()
    chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
    widths = pair_widths(objective.model, pairs, hd_num)
    for mb in batching.token_budget_batches(widths, token_budget, shuffle=False, overhead=PAIR_OVERHEAD):
        c, r = objective(objective.prepare([pairs[i] for i in mb]))
        for i, ci, ri in zip(mb, c.tolist(), r.tolist()):
            chosen[i], rejected[i] = ci, ri
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


def blank_image_check(objective, held, token_budget=8192, hd_num=9):
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
        accuracy = lambda pairs: eval_rm(objective, pairs, token_budget, hd_num)["heldout_accuracy"]  # noqa: E731
        return {"image_check": {"pairs": len(need), "accuracy_with_image": accuracy(need),
                                "accuracy_blank_image": accuracy(blanked)}}


def train_rm(a, rank, n_proc, device):
    out = common.prepare_out(a.out, a.resume, rank)
    rm = RewardModel.from_pretrained(a.init or WORLD_SFT, device=device, seed=a.seed,
                                     head={"linear": "score", "mlp": "score_mlp"}[a.head])
    rm.model.gradient_checkpointing = a.grad_ckpt
    freeze_vision(rm, a.freeze_vision != "no")
    pairs, held = rm_data(a, rank)
    lengths = pair_widths(rm, pairs, a.hd_num)
    objective = PairRewards(rm, a.hd_num, a.train_transform, a.max_length, a.share_prefix)
    fwd = common.wrap(objective, n_proc, a.fsdp)  # under FSDP2 the same module, sharded in place
    opt = common.make_optimizer(rm, a.lr, a.weight_decay, a.beta2)
    amp = common.autocast(device, a.autocast)
    run = common.Run(a, out, rank, n_proc, rm, opt, ["loss", "accuracy", "grad_norm"], "reward model")
    trainable = [p for p in rm.parameters() if p.requires_grad]

    def evaluate(final=False):  # DDP: rank 0 alone, unwrapped; FSDP: every rank, so that the all-gathers pair up
        if not held or not (rank == 0 or a.fsdp):
            return {}
        with amp():
            result = eval_rm(objective, held, a.token_budget, a.hd_num)
            if final:
                result.update(blank_image_check(objective, held, a.token_budget, a.hd_num))
        if a.fsdp and n_proc > 1:
            fwd.reshard()  # FSDP2 leaves the root gathered after a forward, for a backward that is not coming
        return result

    per_epoch = max(1, len(pairs) // a.batch)
    # the official stream, image, image, text, ...: every step holds both kinds, 2:1, in a fresh order per epoch
    epoch_order = functools.lru_cache(maxsize=1)(
        lambda epoch: data.mix_image_text([bool(p["images"]) for p in pairs], a.seed + epoch))
    while run.step < a.steps:
        mine, micro = run.share(epoch_order(run.step // per_epoch), per_epoch, lengths, device, PAIR_OVERHEAD)
        fwd.train()
        loss_total, n_correct = 0.0, 0
        prepared = batching.Prefetcher(lambda mb: objective.prepare([pairs[mine[i]] for i in mb]), micro, a.prefetch)
        for k, seqs in enumerate(prepared):
            with common.no_sync_unless(k == len(micro) - 1, fwd), amp():
                chosen, rejected = fwd(seqs)  # r(x, y_w), r(x, y_l)
                loss = bt_loss(chosen, rejected, a.center_coef)  # Eq. 1 (+ centring: the logged loss too)
                (loss * n_proc / a.batch).backward()  # DDP and FSDP average over ranks: the global mean
            loss_total += loss.item()
            n_correct += (chosen > rejected).sum().item()
        run.stop_if_not_finite(loss_total)
        lr = common.lr_at(run.step, a.lr, a.steps, a.warmup)  # warm-up, then cosine to 0
        common.set_lr(opt, lr)
        grad_norm = common.clip_and_step(trainable, opt, a.clip)
        run.step += 1
        correct, n = common.sum_over_ranks(torch.tensor([n_correct, len(mine)], dtype=torch.float64), n_proc).tolist()
        run.log_step(loss_total, [[lengths[mine[i]] for i in mb] for mb in micro], grad_norm, lr,
                     accuracy=correct / n)   # over all ranks, as the loss
        if run.save_evaluate_or_stop(evaluate):
            return None
    summary = run.finish(evaluate(final=True))
    if "reward_mean" in summary:  # the held-out reward statistics PPO normalises with
        rm.cfg.reward_mean, rm.cfg.reward_std = summary["reward_mean"], summary["reward_std"]
        weights = {k: common.to_cpu(v, rank == 0) for k, v in rm.state_dict().items()}
        if rank == 0:
            rm.save_pretrained(out, metadata={"step": run.step}, state=weights)
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
