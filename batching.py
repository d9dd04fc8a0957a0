"""Custom CUDA-aware batching: what decides how many tokens a forward sees, and how they reach the device.

Every stage cuts its rows into micro-batches by a token budget: the padded tensor a micro-batch builds (rows x the
widest row, counted the way the stage pads) never exceeds --token-budget, so memory follows the flag
(`token_budget_batches`). Under FSDP the ranks run equally many forwards (`micro_batches`). The log-probs and
entropy over the vocabulary (92,544 tokens at 7B) are computed a chunk of tokens at a time, so that the
[B, T, V] fp32 tensor never exists whole (`token_logprobs`). Host-to-device copies go through pinned memory without blocking
(`to_device`); the data of the next micro-batch (image decode, HD tiling, tokenisation, pinning) is prepared on a
background thread while the device computes the current one (`Prefetcher`). Anything read back to the host is read
once per tensor, never per row: on a GPU each read waits for every kernel queued before it.

The anchors: OpenRLHF's experience maker (micro-batches by tokens), TRL's chunked log-softmax, nanochat's engine
(device-resident sampling). docs/scale.md measures what this buys.
"""
import math
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Token-budget cuts


def width(parts):
    """Padded width of a row: an int, or a tuple of parts that a batch pads separately (a left-padded prompt and a
    right-padded response: the batch is max P + max T wide, not max (P + T))."""
    return parts if isinstance(parts, int) else sum(parts)


def batch_width(rows):
    """Width of the padded tensor built from `rows` (ints or tuples of parts): the sum of each part's longest."""
    if isinstance(rows[0], int):
        return max(rows)
    return sum(max(parts) for parts in zip(*rows))


def token_budget_batches(lengths, budget, seed=0, shuffle=True, bucket=64, overhead=32):
    """Micro-batches of indices whose padded size (rows x `batch_width`) stays within `budget` tokens; `lengths` are
    ints, or tuples of parts padded separately (`width`). Sorting inside windows of `bucket` * (typical batch)
    samples keeps padding low while the order stays random; each sorted window is then cut where padded tokens +
    `overhead` tokens per micro-batch (a forward call's fixed cost) is least, instead of filling every micro-batch
    to the budget, which pads short samples to long ones whenever the lengths spread: on a world RM step's share,
    filling wastes 18% of the tokens on padding and the cheapest cuts 7%, in the same wall time. A single row wider than the budget stands alone."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    typical = max(1, budget // max(1, int(sum(map(width, lengths)) / max(len(lengths), 1))))
    window = bucket * typical
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda i: width(lengths[i]))
        batches += [chunk[i:j] for i, j in _cheapest_cuts([lengths[i] for i in chunk], budget, overhead)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def _cheapest_cuts(rows, budget, overhead):
    """[(start, end)] splitting rows sorted by width into contiguous micro-batches within `budget` padded tokens at
    the least total padded tokens + overhead (dynamic programming over the cut points)."""
    n = len(rows)
    parts = [(r,) if isinstance(r, int) else r for r in rows]
    cost, cut = [0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        longest = list(parts[j - 1])
        for i in range(j - 1, -1, -1):
            longest = [max(x, y) for x, y in zip(longest, parts[i])]
            size = (j - i) * sum(longest)
            if j - i > 1 and size > budget:
                break
            if cost[i] + size + overhead < cost[j]:
                cost[j], cut[j] = cost[i] + size + overhead, i
    spans, j = [], n
    while j:
        spans.append((cut[j], j))
        j = cut[j]
    return spans[::-1]


def padding_waste(lengths, batches):
    real = sum(width(lengths[i]) for b in batches for i in b)
    padded = sum(batch_width([lengths[i] for i in b]) * len(b) for b in batches)
    return 1.0 - real / padded


def micro_batches(lengths, budget, n_proc, fsdp, device, overhead=32):
    """A step's share cut into micro-batches of at most `budget` padded tokens, in length order. Under FSDP each
    forward all-gathers every layer, so every rank runs as many micro-batches as the one that needs the most,
    splitting its largest until it has them (one collective and one host read per call). A share too small for that
    (PPO's mini-batches are drawn from the global batch, so a rank's share can be empty) gets empty micro-batches:
    the caller still runs a forward for each, on a stand-in row that weighs nothing, and at least one, so that
    DDP's all-reduce pairs up too."""
    micro = token_budget_batches(lengths, budget, shuffle=False, overhead=overhead) or [[]]
    if n_proc > 1 and fsdp:
        n = torch.tensor(len(micro), device=device)  # NCCL reduces device tensors only
        dist.all_reduce(n, dist.ReduceOp.MAX)
        for _ in range(int(n) - len(micro)):
            micro.sort(key=len)
            big = micro.pop()
            micro += [big[:len(big) // 2], big[len(big) // 2:]]
    return micro


# ----------------------------------------------------------------------------------------------------------------
# Log-probs by chunks of tokens


class ChunkLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] and the entropy, for a chunk of tokens. The backward recomputes the chunk's
    logits from h instead of keeping them (d logp / d logits = onehot(target) - softmax, over T), so that only h
    outlives the forward; the entropy is logged, never differentiated. Under autocast the recomputation takes the
    forward's casts, so the gradient is the one of the forward's numbers."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature):
        ctx.amp = (h.device.type, torch.is_autocast_enabled(h.device.type),
                   torch.get_autocast_dtype(h.device.type))
        logits = F.linear(h, weight).float() / temperature
        lse = torch.logsumexp(logits, -1)
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)
        ctx.save_for_backward(h, weight, targets)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _):
        h, weight, targets = ctx.saved_tensors
        device_type, amp, amp_dtype = ctx.amp
        with torch.autocast(device_type, amp_dtype, enabled=amp):
            logits = F.linear(h, weight).float() / ctx.temperature
        grad = torch.softmax(logits, -1).mul_(-grad_logp[:, None])
        grad.scatter_add_(-1, targets[:, None], grad_logp[:, None]).div_(ctx.temperature)
        grad = grad.to(amp_dtype if amp else weight.dtype)
        grad_h = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ h.to(grad.dtype) if ctx.needs_input_grad[1] else None
        return (grad_h.to(h.dtype) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None, None)


# tokens per chunk of the log-probs' logits: 512 x 92,544 fp32 is 190 MB
LOGPROB_CHUNK = 512


def token_logprobs(head, h, targets, temperature=1.0, chunk=LOGPROB_CHUNK):
    """log softmax(head(h) / T)[target] and the entropy of that distribution, for h [B, T, D] and targets [B, T],
    `chunk` tokens at a time (`head`: a bias-free Linear, the LM head): the fp32 logits never exist for more than
    `chunk` tokens, in the forward or the backward, where the whole [B, T, V] log-softmax took B x T x V x 4 bytes
    several times over. The price: the LM head's matmul runs once more in the backward."""
    B, T, D = h.shape
    h, targets = h.reshape(B * T, D), targets.reshape(B * T)
    temperature = max(temperature, 1e-6)
    parts = [ChunkLogprobs.apply(h[s:s + chunk], head.weight, targets[s:s + chunk], temperature)
             for s in range(0, B * T, chunk)]
    return torch.cat([p[0] for p in parts]).view(B, T), torch.cat([p[1] for p in parts]).view(B, T)


# ----------------------------------------------------------------------------------------------------------------
# Host to device


def to_device(t, device):
    """A host tensor on `device`: on CUDA through pinned (page-locked) memory and without blocking the host, so the
    copy overlaps the kernels already queued; elsewhere a plain move."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def ids_to_device(rows, device):
    """Token-id lists -> device tensors, in one pinned copy for all of them (one transfer, not one per row)."""
    flat = torch.tensor([i for r in rows for i in r], dtype=torch.long)
    return list(to_device(flat, device).split([len(r) for r in rows]))


class Prefetcher:
    """`prepare(item)` for each of `items`, computed on one background thread up to `depth` items ahead of the
    consumer, yielded in order: the host decodes images, tiles them and tokenises the next micro-batch while the
    device computes this one. One worker runs the items in order, so every random draw of `prepare` is what it is
    without prefetching; `depth=0` prepares inline (the same results, no thread). An exception in `prepare` is
    raised in the consumer, at the item that raised it."""

    def __init__(self, prepare, items, depth=2):
        self.prepare, self.items, self.depth = prepare, list(items), depth

    def __iter__(self):
        if self.depth == 0:
            yield from map(self.prepare, self.items)
            return
        pool = ThreadPoolExecutor(max_workers=1)
        ahead = deque(pool.submit(self.prepare, item) for item in self.items[:self.depth])
        try:
            for k in range(len(self.items)):
                out = ahead.popleft().result()
                if k + self.depth < len(self.items):
                    ahead.append(pool.submit(self.prepare, self.items[k + self.depth]))
                yield out
        finally:  # a consumer that stops early leaves nothing running
            pool.shutdown(cancel_futures=True)


def pin(tensors, device):
    """Host tensors in page-locked memory when they go to a GPU (to_device then copies them without blocking): the
    prefetch thread pins, so the consumer does not."""
    return [t.pin_memory() for t in tensors] if device.type == "cuda" else tensors


def pad_right(rows, pad, device):
    """Token-id lists -> [B, max len] on `device`, right-padded with `pad`, and the lengths [B]; one pinned copy."""
    n = max(1, max(map(len, rows)))
    out = torch.full((len(rows), n), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return to_device(out, device), to_device(torch.tensor([len(r) for r in rows]), device)

