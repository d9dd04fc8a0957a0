"""What every training stage shares and no algorithm owns: processes, wrapping for DDP / FSDP2, the optimizer and
its schedule, atomic checkpoints with exact resume, the bookkeeping around the sft and rm loops (Run) and the metrics
log (its pictures: figures.py).

It exists so that `train.py` (sft, rm) and `ppo.py` can each hold one visible loop without importing one another.
Nothing here knows a stage.
"""
import contextlib
import gc
import json
import math
import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import batching
import data
import figures

# ----------------------------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK / WORLD_SIZE; one process without it.


def setup_distributed():
    """(rank, world size, device). Rank 0 alone writes checkpoints while the others wait in a collective: a 7B
    checkpoint with its optimizer state can take longer than the default 10-minute timeout."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size(), device


def teardown_distributed(world):
    """A gloo group left for the interpreter's exit can abort it ("terminate called without an active exception",
    pytorch#190489). DDP's and FSDP's hooks keep the models, which hold the group, in reference cycles: collect
    them, then destroy the group while the interpreter is whole."""
    if world > 1:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def log(rank, *a):
    if rank == 0:
        print(*a, flush=True)


def sum_over_ranks(t, world):
    """Sum of a small tensor over the ranks, moved to the device the backend needs (NCCL: the GPU)."""
    if world == 1:
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(dev)
    dist.all_reduce(out)
    return out.to(t.device)


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


# ----------------------------------------------------------------------------------------------------------------
# Wrapping. The module wrapped is an objective: its forward takes raw samples and returns what the loss is made
# of, because splicing reads the token embeddings and image separators before the decoder runs, so the whole
# computation must happen inside the wrapped forward for DDP to arm its all-reduce and for FSDP to gather them.


def wrap(objective, world, fsdp=False):
    """One process: as is. torchrun: DDP, or FSDP2 with one all-gather / reduce-scatter unit per decoder layer and
    the root (embeddings, norm, head, separators) as another."""
    if world == 1:
        return objective
    if not fsdp:
        # PLoRA and the separators get no gradient from a text-only micro-batch
        return torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    # frozen parameters (ViT + vision_proj) stay whole on every rank: nothing to shard, small next to the decoder
    shard(objective, lambda o: {p for p in o.parameters() if not p.requires_grad})
    # a rank whose micro-batch has no image reduces zeros for PLoRA (as DDP's find_unused_parameters), so that the
    # ranks' reduce-scatters match
    objective.set_reduce_scatter_unused_params(True)
    return objective


def shard(objective, whole):
    """FSDP2 in place: each decoder layer of `objective.model` a unit, the rest of the decoder the root's; the
    parameters `whole(objective)` stay unsharded on every rank. On the CPU each parameter is copied first, so that
    the checkpoint's bytes are freed (docs/scale.md, Sharding on the CPU)."""
    for module in objective.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type == "cpu":
                module._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    for layer in objective.model.model.layers:
        fully_shard(layer)
    fully_shard(objective, ignored_params=whole(objective))
    return objective


def shard_frozen(objective, world, fsdp):
    """A frozen model (PPO's reference and reward models) under --fsdp: its decoder sharded as a trained one's, so
    that no rank holds it whole; the vision path (ViT, projector, separators) stays whole, as in `wrap`. It has no
    gradient to synchronise, so DDP has nothing to do for it."""
    if world == 1 or not fsdp:
        return objective
    return shard(objective, lambda o: {*o.model.vit.parameters(), *o.model.vision_proj.parameters(),
                                       o.model.plora_glb_GN, o.model.plora_sub_GN})


def unwrap(wrapped):
    """The objective inside DDP (for passes without gradients, which need no all-reduce); FSDP shards in place."""
    return wrapped.module if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else wrapped


def sharded(module):
    return isinstance(module, FSDPModule)


def release(wrapped):
    """FSDP2 keeps the root's parameters gathered after a forward, for the backward that usually follows; after a
    forward without one (scoring, evaluation), free them."""
    if sharded(wrapped):
        wrapped.reshard()


def unsharded_copy(model, dtype=None):
    """A plain (hook-free) copy of an FSDP-sharded model with whole weights, in `dtype` (default: the model's), for
    work that calls the model step by step outside a wrapped forward: generation. Every rank calls it (one all-gather
    per tensor); tensors that FSDP leaves whole (the vision path) are shared, not copied, when the dtype matches."""
    with torch.device("meta"):
        copy = type(model)(model.cfg)
    whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    # one tensor at a time: the whole fp32 tensor is freed as soon as its copy in `dtype` exists
    copy.load_state_dict({k: whole(v.detach()).to(dtype or v.dtype) for k, v in model.state_dict().items()},
                         assign=True)
    copy.tokenizer = model.tokenizer
    return copy.requires_grad_(False).eval()


def no_sync_unless(last, wrapped):
    """DDP all-reduces in the backward of a forward run outside no_sync: only a step's last micro-batch does, so
    each rank reduces once per step however many micro-batches its share packs into. FSDP reduce-scatters after
    each micro-batch, so that only a shard of the gradients is ever held."""
    ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    return wrapped.no_sync() if ddp and not last else contextlib.nullcontext()


@contextlib.contextmanager
def root_gathered(wrapped):
    """FSDP2: the root's own parameters (embeddings, separators, norm, head) gathered outside a forward, for work
    that calls the model directly (generation); each layer still gathers itself call by call. Every rank must run
    the same calls."""
    if not isinstance(wrapped, FSDPModule):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def matmul_gflops(n=1024, reps=5):
    """This machine's fp32 matmul speed now, in GFLOP/s (best of `reps`), recorded beside every wall time: these
    machines vary up to 5x from day to day, so a time means little without it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return round(2 * n ** 3 / best / 1e9, 1)


def autocast_on(device, mode):
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def autocast(device, mode, cache=True):
    """bf16 autocast of the forward passes over fp32 weights (auto: on CUDA only). Its cache keeps the bf16 copy of
    every weight it cast until the region ends; `cache=False` for regions that run whole models without a backward
    (or FSDP, whose layers free their gathered weights after each forward): the copies then live only as long as
    a backward needs them."""
    on = autocast_on(device, mode)
    return lambda: torch.autocast(device.type, torch.bfloat16, enabled=on, cache_enabled=cache)


def to_cpu(t, keep=True):
    """A tensor on the CPU, gathered whole first if FSDP shards it (a collective: every rank calls it; only the
    `keep` ones hold the result)."""
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().contiguous().cpu() if keep else None


def like(t, ref):
    """A whole tensor laid out as `ref`: this rank's shard when FSDP shards `ref` (every rank read the same file)."""
    return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None) \
        if isinstance(ref, DTensor) else t


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule (the official recipe: AdamW, beta2 0.95, wd 0.1, 1% warmup, cosine to 0, clip 1.0)


def make_optimizer(model, lr, weight_decay, beta2):
    """AdamW; no weight decay on the vectors (norms, biases), as the Hugging Face Trainer behind the official script
    decays by name; the image separators `plora_glb_GN` / `plora_sub_GN`, stored 3-D and 4-D, are decayed there too."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for n, p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel for all parameters (CPU and CUDA), where foreach took 2-3x longer at 117M parameters
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=1e-8, fused=True)


def lr_at(step, lr, steps, warmup):
    """Linear warmup over the first `warmup` fraction of the steps, then cosine to zero."""
    warm = max(1, int(warmup * steps))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def clip_and_step(params, opt, clip):
    """Global grad-norm clip, one optimizer step; returns the norm before clipping."""
    norm = to_cpu(torch.nn.utils.clip_grad_norm_(params, clip)).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------------------------------------------
# Run directory and checkpoints


def prepare_out(out, resume, rank):
    """The run directory: an existing run is continued with --resume, never trained over."""
    out = Path(out)
    if (out / "resume.safetensors").exists() and not resume:
        raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    return out


def save_checkpoint(out, model, opt, step, write=True):
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
    out.mkdir(parents=True, exist_ok=True)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": opt_state["param_groups"], "python_rng": random.getstate()}
    tmp = out / "resume.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    os.replace(tmp, out / "resume.safetensors")
    model.save_pretrained(out, metadata={"step": step}, state=weights)


def load_checkpoint(out, model, opt):
    """Restore model, optimizer and RNG from resume.safetensors; returns the step. Under FSDP each rank keeps its
    shard of every tensor, read one at a time."""
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
    return meta["step"]


def trim_metrics(path, step):
    """On resume, forget log lines of steps after the checkpoint: they are about to be run again, as is a line
    logged at the start of the step resumed from ("phase": "start"). A line cut short by the kill is dropped too."""
    def before(line):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return False
        return rec.get("step", 0) < step or rec.get("step", 0) == step and rec.get("phase") != "start"
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if before(line)]
        data.atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------------------------------------------
# The bookkeeping around the sft and rm loops' math (train.py)


class Run:
    """Resuming from --out, a step's share of the data, the metrics line, checkpoints, evaluation, --stop-after and
    the summary, for every stage (PPO's step is an iteration). `parts`: more (sub-directory, model, optimizer)
    saved and resumed beside the main one (PPO's critic). FSDP: every rank gathers its shards for a checkpoint,
    rank 0 writes; DDP: the ranks must hold the same weights (a gradient that missed the all-reduce shows here)."""

    def __init__(self, a, out, rank, n_proc, model, opt, curve_keys, title, parts=(), xlabel=None):
        self.a, self.out, self.rank, self.n_proc, self.model, self.opt = a, out, rank, n_proc, model, opt
        self.curve_keys, self.title, self.step, self.saved_step = curve_keys, title, 0, None
        self.parts = [("", model, opt)] + [p for p in parts if p[1] is not None]
        self.xlabel = xlabel
        if a.resume:
            for sub, m, o in self.parts:
                self.step = self.saved_step = load_checkpoint(out / sub, m, o)
            log(rank, f"resumed {out} at step {self.step}")
            if rank == 0:
                trim_metrics(out / "metrics.jsonl", self.step)
        self.first_step, self.t0, self.tokens, self.pads = self.step, time.time(), 0, []
        trainable = [p for p in model.parameters() if p.requires_grad]
        log(rank, f"{a.stage}: {a.steps} steps of {a.batch}, {n_proc} process(es), "
                         f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable of "
                         f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")

    def share(self, order, per_epoch, lengths, device, overhead=32):
        """This rank's samples of the current step (indices into `order`'s dataset) and their micro-batches. A step
        takes the next --batch samples of the epoch's shuffled order (an epoch's tail shorter than a batch is left
        out); sorted by length, they are dealt to the ranks in turn, so that every rank gets short and long ones
        alike, and each rank's share packs into micro-batches of at most --token-budget padded tokens."""
        a, at = self.a, (self.step % per_epoch) * self.a.batch
        mine = sorted(order[at:at + a.batch], key=lambda i: lengths[i])[self.rank::self.n_proc]
        return mine, batching.micro_batches([lengths[i] for i in mine], a.token_budget, self.n_proc, a.fsdp, device,
                                            overhead)

    def stop_if_not_finite(self, loss_total):
        """Before the optimizer step: a NaN or infinite loss ends the run, and no checkpoint ever holds its weights."""
        if not torch.isfinite(torch.tensor(loss_total)):
            last = f"the last good checkpoint is {self.out} (step {self.saved_step})" if self.saved_step is not None \
                else "no checkpoint was written yet"
            raise SystemExit(f"error: loss is {loss_total} at step {self.step + 1}; stopping without saving; {last}")

    def log_step(self, loss_total, micro_lengths, grad_norm, lr, **extra):
        """The step's metrics line, printed and logged every 10 steps and at the last; `micro_lengths` are the
        tokens of each micro-batch's samples. The loss is the mean over every rank's samples (a collective)."""
        a, step = self.a, self.step
        loss_total, n = sum_over_ranks(torch.tensor([loss_total, sum(map(len, micro_lengths))], dtype=torch.float64),
                                       self.n_proc).tolist()
        real, padded = sum(map(sum, micro_lengths)), sum(max(mb) * len(mb) for mb in micro_lengths)
        self.tokens += real
        self.pads = (self.pads + [(real, padded)])[-10:]
        rec = {"step": step, "loss": loss_total / n, **extra, "grad_norm": grad_norm,
               "lr": lr, "padding_waste": 1 - sum(r for r, _ in self.pads) / sum(p for _, p in self.pads),
               "tokens_per_s": self.tokens * self.n_proc / (time.time() - self.t0)}
        if self.rank == 0 and (step % 10 == 0 or step == a.steps):
            eta = (time.time() - self.t0) / (step - self.first_step) * (a.steps - step)
            print(f"step {step}/{a.steps} " + " ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "step")
                  + f" eta {eta:.0f}s", flush=True)
            append_jsonl(self.out / "metrics.jsonl", rec)

    def save(self):
        fsdp = self.a.fsdp and self.n_proc > 1
        for sub, model, opt in self.parts:
            if not fsdp:
                check_replicas(model, self.n_proc, sub or "model")
            if self.rank == 0 or fsdp:
                save_checkpoint(self.out / sub, model, opt, self.step, write=self.rank == 0)
        self.saved_step = self.step

    def save_evaluate_or_stop(self, evaluate):
        """A checkpoint every --save-every steps and at the last, `evaluate()` logged every --eval-every steps;
        True when --stop-after ends this invocation here (saved, for --resume)."""
        a, step = self.a, self.step
        if step % a.save_every == 0 or step == a.steps:
            self.save()
        if a.eval_every and step % a.eval_every == 0 and step < a.steps:
            metrics = evaluate()
            if self.rank == 0 and metrics:
                append_jsonl(self.out / "metrics.jsonl", {"step": step, **metrics})
        if a.stop_after and step - self.first_step >= a.stop_after and step < a.steps:
            self.save()
            log(self.rank, f"stopped after {a.stop_after} steps at step {step}; continue with --resume")
            return True
        return False

    def finish(self, metrics):
        summary = {"stage": self.a.stage, "steps": self.step, "seconds": round(time.time() - self.t0, 1),
                   "matmul_gflops": matmul_gflops(), "processes": self.n_proc,
                   "command": " ".join(sys.argv), "seed": self.a.seed, **metrics}
        if self.rank == 0:   # the summary first: the curves draw its held-out figures
            data.atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
            figures.write_curves(self.out, self.curve_keys, f"{self.title}: {self.out.name}", xlabel=self.xlabel)
            print(json.dumps(summary, indent=2))
        return summary


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
