"""The CUDA-aware batching (batching.py) and what it promises PPO and the training stages: host reads per PPO
iteration that do not grow with the micro-batches, log-probs whose largest tensor is a chunk's, micro-batches no
wider than the token budget in any stage, exact ratio 1 and KL 0 under bf16 autocast, prefetching that changes no
weight, generation that drops ended rows without changing a token."""
import argparse
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import batching
import model as model_module
import ppo
from model import KVCache, InternLM2Model, InternLMXComposer2
from test_train import run, world  # noqa: F401  (the small-world fixture)

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class CountHostReads:
    """Counts the tensor methods that read a value back to the host (on a GPU each one waits for the queue)."""

    def __init__(self, monkeypatch):
        self.n, self.on = 0, False
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self.counting(original))

    def counting(self, original):
        def read(t, *args, **kw):
            # AdamW's step counters are host tensors (torch.optim): reading them waits for nothing
            if self.on and "torch/optim" not in sys._getframe(1).f_code.co_filename:
                self.n += 1
            return original(t, *args, **kw)
        return read


def one_iteration_reads(world, rm, tmp_path, monkeypatch, budget):  # noqa: F811
    """Host reads from the start of the rollout to the iteration's statistics (the loop proper: not loading,
    saving or the checker), micro-batches per policy pass, and decoding steps, of one PPO iteration."""
    counter, forwards, steps = CountHostReads(monkeypatch), [], []
    collect, read_stats, sample_token = ppo.collect_rollouts, ppo.read_stats, model_module.sample_token

    def start(*a, **kw):
        counter.on = True
        return collect(*a, **kw)

    def stop(*a, **kw):
        out = read_stats(*a, **kw)
        counter.on = False
        return out

    def step(*a, **kw):
        if counter.on:
            steps.append(1)
        return sample_token(*a, **kw)
    monkeypatch.setattr(ppo, "collect_rollouts", start)
    monkeypatch.setattr(ppo, "read_stats", stop)
    monkeypatch.setattr(model_module, "sample_token", step)
    forward = ppo.PolicyLogprobs.forward
    monkeypatch.setattr(ppo.PolicyLogprobs, "forward", lambda self, r: forwards.append(len(r)) or forward(self, r))
    run(world, tmp_path / f"ppo{budget}", "--rm", str(rm), "--steps", "1", "--batch", "8", "--max-new-tokens", "8",
        "--token-budget", str(budget), "--mini-batches", "1", "--ppo-epochs", "1", "--eval-every", "0", stage="ppo")
    return counter.n, len(forwards), len(steps)


def test_host_reads_do_not_grow_with_micro_batches(world, tmp_path, monkeypatch):  # noqa: F811
    """One PPO iteration reads back to the host about once per decoding step (has every row ended?) plus a fixed
    handful, and the same number whether a pass runs a few micro-batches or one per row (the statistics stay on
    the device). Before batching.py: 3,302 reads per iteration of the world's default run, 5,263 at a 16x smaller
    budget."""
    rm = tmp_path / "rm"
    run(world, rm, "--steps", "1")
    counts = {}
    for budget in (100000, 1):
        with monkeypatch.context() as m:
            counts[budget] = one_iteration_reads(world, rm, tmp_path, m, budget)
    (few_reads, few_fwd, few_steps), (many_reads, many_fwd, many_steps) = counts[100000], counts[1]
    # three policy passes (rollout: policy, reference; update): a row per micro-batch at budget 1, 8 per pass
    assert many_fwd == 3 * 8 and few_fwd < many_fwd / 2, counts
    assert few_steps == many_steps  # the same samples (sampling is seeded per row)
    assert few_reads == many_reads, counts
    assert few_reads <= few_steps + 10, counts


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_chunked_logprobs_equal_the_full_softmax_and_never_build_it():
    """token_logprobs against log_softmax over the whole [B, T, V]: the same log-probs, entropy and gradients, while
    the largest tensor of the forward and backward is a chunk's logits (here 1/8 of B x T x V x 4 bytes)."""
    torch.manual_seed(0)
    B, T, D, V, chunk = 4, 32, 16, 3000, 16
    head = torch.nn.Linear(D, V, bias=False)
    h = torch.randn(B, T, D, requires_grad=True)
    targets = torch.randint(V, (B, T))
    full = torch.log_softmax(head(h) / 0.7, -1)
    want_logp = full.gather(-1, targets[..., None]).squeeze(-1)
    want_entropy = -(full.exp() * full).sum(-1)
    want_grad = torch.autograd.grad(want_logp.sum(), [h, head.weight])
    with LargestTensor() as seen:
        logp, entropy = batching.token_logprobs(head, h, targets, 0.7, chunk)
        grad = torch.autograd.grad(logp.sum(), [h, head.weight])
    torch.testing.assert_close(logp, want_logp)
    torch.testing.assert_close(entropy, want_entropy)
    for g, w in zip(grad, want_grad):
        torch.testing.assert_close(g, w)
    assert seen.largest <= chunk * V * 4 < B * T * V * 4 / 4, seen.largest


def test_budget_counts_the_batch_as_built():
    """A prompt and a response padded apart make a batch max P + max T wide: the cuts bound that, not max (P + T)."""
    rows = [(100, 10), (10, 100), (60, 60), (5, 5)]
    for mb in batching.token_budget_batches(rows, 240, shuffle=False):
        assert len(mb) == 1 or len(mb) * batching.batch_width([rows[i] for i in mb]) <= 240
    assert batching.batch_width([(100, 10), (10, 100)]) == 200


def widths_seen(monkeypatch):
    """rows x width of every forward without a generation cache (training, scoring and evaluation passes)."""
    seen, forward = [], InternLM2Model.forward

    def record(self, embeds, im_mask=None, attention_mask=None, position_ids=None, cache=None):
        if not isinstance(cache, KVCache):
            seen.append(tuple(embeds.shape[:2]))
        return forward(self, embeds, im_mask, attention_mask, position_ids, cache)
    monkeypatch.setattr(InternLM2Model, "forward", record)
    return seen


@pytest.mark.parametrize("stage, extra", [("sft", []), ("rm", []), ("rm", ["--share-prefix", "0"]), ("ppo", [])])
def test_no_micro_batch_is_wider_than_the_budget(world, tmp_path, monkeypatch, stage, extra):  # noqa: F811
    """Every forward of every stage, with a budget small enough to cut: rows x padded width <= --token-budget
    (a single row wider than the budget stands alone)."""
    budget = 400
    if stage == "ppo":
        run(world, tmp_path / "rm", "--steps", "1")
        extra = ["--rm", str(tmp_path / "rm"), "--max-new-tokens", "8", "--eval-every", "0"]
    seen = widths_seen(monkeypatch)
    run(world, tmp_path / stage, "--steps", "1", "--token-budget", str(budget), *extra, stage=stage)
    assert seen and all(rows == 1 or rows * width <= budget for rows, width in seen), seen


def test_bf16_autocast_first_iteration_has_ratio_one_and_kl_zero(world, tmp_path):  # noqa: F811
    """Under --autocast bf16 the reference computes through the policy's casts: at iteration 0 the KL is 0 and the
    ratio 1, exactly (before, a bf16-held reference against an fp32 policy logged KL 2e-4)."""
    run(world, tmp_path / "rm", "--steps", "1")
    run(world, tmp_path / "ppo", "--rm", str(tmp_path / "rm"), "--steps", "1", "--max-new-tokens", "8",
        "--mini-batches", "1", "--ppo-epochs", "1", "--autocast", "bf16", "--eval-every", "0", stage="ppo")
    first = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == 0.0 and first["ratio"] == 1.0 and first["approx_kl"] == 0.0, first


def test_top_p_is_refused_under_ppo(world, tmp_path):  # noqa: F811
    run(world, tmp_path / "rm", "--steps", "1")
    with pytest.raises(SystemExit, match="--top-p 0.9: PPO and RLOO sample from the full softmax"):
        run(world, tmp_path / "ppo", "--rm", str(tmp_path / "rm"), "--top-p", "0.9", stage="ppo")


def rloo_args(**kw):
    p = argparse.ArgumentParser()
    ppo.add_args(p)
    a = p.parse_args([])
    a.algo, a.kl_coef = "rloo", 0.0
    vars(a).update(kw)
    return a


def test_rloo_advantages_are_the_leave_one_out_baseline_unwhitened():
    """Two prompts, three samples each, scores by hand: each row's advantage is its score minus the mean of its
    siblings', on every token, unless --rloo-whiten asks for whitening."""
    rollout = ppo.Rollout.start([[1, 2], [1], [1, 2, 3], [4], [4, 5], [4]], [True] * 6, 0, [[[1]]] * 6, {}, [1] * 6,
                                [None] * 6, [0, 0, 0, 1, 1, 1])
    rollout.score = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])
    ppo.compute_advantages(rollout, rloo_args())
    want = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 3.0, 3 - 1.5, 3 - 1.5])
    torch.testing.assert_close(rollout.adv, want[:, None] * rollout.mask)
    ppo.compute_advantages(rollout, rloo_args(rloo_whiten=True))
    assert rollout.adv.masked_select(rollout.mask.bool()).mean().abs() < 1e-6  # whitened: token mean 0


def test_rollout_fields_share_no_tensor():
    rollout = ppo.Rollout.start([[1, 2]], [True], 0, [[[1]]], {}, [1], [None], [0])
    tensors = [v for v in vars(rollout).values() if isinstance(v, torch.Tensor)]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)


def test_prefetching_changes_no_weight(world, tmp_path):  # noqa: F811
    """The reward and SFT stages with the next micro-batches prepared on a background thread, and inline: the
    same batches, bit-identical weights."""
    for stage in ("rm", "sft"):
        for depth in ("0", "2"):
            run(world, tmp_path / f"{stage}{depth}", "--steps", "2", "--token-budget", "300", "--prefetch", depth,
                stage=stage)
        a, b = (load_file(str(tmp_path / f"{stage}{d}" / "model.safetensors")) for d in ("0", "2"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage


def test_prefetcher_keeps_order_and_raises_where_prepare_raised():
    assert list(batching.Prefetcher(lambda x: x * x, range(7), depth=2)) == [x * x for x in range(7)]

    def prepare(x):
        if x == 3:
            raise ValueError("row 3 is bad")
        return x
    got = []
    with pytest.raises(ValueError, match="row 3 is bad"):
        for x in batching.Prefetcher(prepare, range(7)):
            got.append(x)
    assert got == [0, 1, 2]


def test_generation_drops_ended_rows_without_changing_a_token(world, monkeypatch):  # noqa: F811
    """Sampling with a generator per row (PPO, best-of-N) and greedy decoding: dropping the rows that have ended
    from the batch and the KV cache gives the tokens of decoding every row to the end. Frequent tokens stop the rows
    (the tiny random policy rarely says </s>), so that they end at different steps."""
    policy = InternLMXComposer2.from_pretrained(world / "sft")
    batch = policy.embed_batch([policy.sequence(q, []) for q in ("Describe the image.", "What colour is it?")],
                               left_pad=True)
    kept = []
    keep = KVCache.keep
    monkeypatch.setattr(KVCache, "keep", lambda self, rows: kept.append(len(rows)) or keep(self, rows))
    for temperature in (1.0, 0.0):
        outs = []
        for drop in (model_module.DROP_ENDED, 2.0):  # 2.0: never enough ended rows to drop any
            monkeypatch.setattr(model_module, "DROP_ENDED", drop)
            gens = [torch.Generator().manual_seed(i) for i in range(8)] if temperature else None
            outs.append(policy.generate(batch["embeds"], batch["im_mask"], batch["attention_mask"], 24, temperature,
                                        stop_ids=list(range(0, 800, 9)), generator=gens, n=4))
        assert torch.equal(outs[0], outs[1])
    assert kept  # rows were dropped
