"""PPO (and critic-free RLOO) for a multimodal chat policy, rewarded by IXC-2.5-Reward.

    torchrun --standalone --nproc_per_node 2 train.py --stage ppo     # the built-in world, against runs/rm

Four roles (paper §4.1; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"): the policy (trained),
a frozen reference copy of it, the frozen reward model, and the critic, initialised from the reward model and read
at every response token. One iteration of `train`: 1. sample responses and score them (`collect_rollouts`); 2.
per-token rewards with a KL penalty and 3. GAE, Eq. 2 (`compute_advantages`); 4. K epochs of the clipped policy (Eq.
3, `policy_loss`) and value (Eq. 4, `value_loss`) losses over shuffled mini-batches (`ppo_update`). The equations
are pure functions of tensors (next section); the rest moves rows between models and processes.

Padding contract (`Rollout`, `model_batch`): prompts left-padded, responses right-padded after them, position ids
count real tokens only, masks come from lengths (a pad id equal to a stop token changes nothing), the score sits on
the last real response token. A prompt is held as `segments`, model.splice's input: a list whose items are either
token ids or an image's index (an int), whose embeddings go in that place.

The rollout lives on the device for the whole iteration and its statistics are read back once per iteration; how
its rows are cut into micro-batches that the token budget bounds, and reach the device, is batching.py's job.
Under torchrun each of the `n_proc` processes samples its share of the prompts, while statistics and mini-batches
are the whole batch's, so any number of processes trains as one (docs/scale.md: DDP, FSDP and the lock-step).
"""
import argparse
import contextlib
import json
import random
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

import batching
import common
import data
import figures
from world import WORLD_SFT, checker, store
from model import InternLMXComposer2
from reward import RewardModel, reward_norm


def add_args(p):
    """PPO hyper-parameters. gamma 1, lambda 0.95, the clips 0.2 and the k1 KL are TRL's and the N+ details'; 2
    epochs x 2 mini-batches (TRL: 4 x 1), the critic's 5 x lr and the missing-EOS penalty of 1 are this project's,
    set on the world. Returns the names of the flags only this stage reads."""
    g = p.add_argument_group("ppo")
    g.add_argument("--algo", choices=["ppo", "rloo"], default="ppo", help="ppo: clipped policy and value losses with a critic (Eq. 2-4); rloo: critic-free, "
                   "the other samples of the prompt as the baseline")
    g.add_argument("--kl-coef", type=float, help="beta of the per-token KL penalty in the reward (TRL's 0.05 with "
                   "--data; the world's 0.1 is chosen from its over-optimisation curve)")
    g.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1",
                   help="per-token KL: k1 log-ratio, k3 Schulman's")
    g.add_argument("--gamma", type=float, default=1.0, help="GAE discount (Eq. 2)")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda (Eq. 2)")
    g.add_argument("--clip-ratio", type=float, default=0.2, help="policy ratio clip epsilon (Eq. 3)")
    g.add_argument("--value-clip", type=float, default=0.2, help="value clip around the rollout's values (Eq. 4)")
    g.add_argument("--critic-lr", type=float, help="the critic's peak learning rate (default: 5 x --lr)")
    g.add_argument("--ppo-epochs", type=data.positive_int, default=2, help="passes over each rollout (K)")
    g.add_argument("--mini-batches", type=data.positive_int, default=2, help="mini-batches per pass over the rollout, one optimizer step each")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use it too)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; PPO and RLOO take only 1 (off), since "
                   "their ratio and KL use the full softmax (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=data.positive_int, default=48, help="response length cap, in tokens")
    g.add_argument("--missing-eos-penalty", type=float, default=1.0, help="subtracted from the reward of a response that "
                   "reached --max-new-tokens without a stop token")
    g.add_argument("--normalize-reward", action=argparse.BooleanOptionalAction, default=True,
                   help="(score - mean) / std with the held-out statistics the RM stage stored in its config; a "
                   "reward model without them is used as it is, said once (default: on)")
    g.add_argument("--rloo-k", type=data.positive_int, default=4, help="rloo: samples per prompt (k)")
    g.add_argument("--rloo-whiten", action="store_true", help="rloo: whiten the leave-one-out advantages over the "
                   "batch's tokens (default: off, as TRL and OpenRLHF; whitening weighs long answers more)")
    g.add_argument("--rollout-chunk", type=data.positive_int, default=32, help="prompts per generation call (the KV cache is sized by it)")
    return {a.dest for a in g._group_actions}


# ----------------------------------------------------------------------------------------------------------------
# The math (paper Eq. 2-4): pure functions of [B, T] tensors; `mask` is 1.0 on response tokens, 0.0 on padding


def kl_penalty(logp, ref_logp, estimator):
    """Per-token KL(pi || pi_ref) estimate: k1 = log ratio, k3 = (r - 1) - log r with r = pi_ref / pi (Schulman)."""
    if estimator == "k1":
        return logp - ref_logp
    log_r = ref_logp - logp
    return log_r.exp() - 1 - log_r


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (paper Eq. 2), backwards over each row's valid tokens; V after the last
    token is 0 (the episode ends there). Returns (advantages, returns = advantages + V)."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def policy_loss(ratio, adv, clip_ratio):
    """Paper Eq. 3 per token, as a loss: -min(r A, clip(r, 1 - eps, 1 + eps) A), r = pi(token) / pi_old(token)."""
    return torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_ratio, 1 + clip_ratio))


def value_loss(v, old_v, returns, value_clip):
    """Paper Eq. 4 per token: 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -eps, eps), the
    critic kept near the values the advantages were computed with."""
    v_clip = old_v + (v - old_v).clamp(-value_clip, value_clip)
    return 0.5 * torch.max((v - returns) ** 2, (v_clip - returns) ** 2)


def whiten(x, mask, shift_mean=True, n_proc=1):
    """Normalise over valid tokens only (padding must not move the statistics), pooled over every rank's rollouts
    (one batch, as in a 1-process run)."""
    total = common.sum_over_ranks(torch.stack([(x * mask).sum(), mask.sum()]), n_proc)
    mean = total[0] / total[1].clamp(min=1)
    var = common.sum_over_ranks(((x - mean) ** 2 * mask).sum(), n_proc) / total[1].clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def pooled_moments(x, n_proc, mask=None):
    """Mean and (unbiased) standard deviation of each row of x [K, N] over its valid entries on every rank: the
    numbers one process holding the whole batch would log."""
    mask = torch.ones_like(x) if mask is None else mask.expand_as(x)
    x = x.double() * mask
    n, s, s2 = common.sum_over_ranks(torch.stack([mask.double().sum(1), x.sum(1), (x * x).sum(1)]), n_proc)
    mean = s / n.clamp(min=1)
    return mean, ((s2 - n * mean ** 2) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()


def compute_advantages(rollout, args, n_proc=1):
    """PPO: per-token rewards -beta * KL with the score added on the last real token, GAE (Eq. 2), whitened
    advantages. RLOO: the sequence reward minus the mean of the other samples of the same prompt, on every token
    (whitened only with --rloo-whiten). Returns the batch's mean KL and score and the score's spread, as device
    tensors."""
    kl = kl_penalty(rollout.old_logp, rollout.ref_logp, args.kl_estimator) * rollout.mask
    if args.algo == "ppo":
        rewards = -args.kl_coef * kl  # 2. the KL penalty on every token, the reward model's score on the last
        last = torch.arange(len(rollout), device=kl.device), rollout.lengths() - 1
        rewards[last] += rollout.score
        adv, rollout.returns = gae(rewards, rollout.values, rollout.mask, args.gamma, args.lam)  # 3. GAE
        rollout.adv = whiten(adv, rollout.mask, n_proc=n_proc)
    else:
        seq_reward = rollout.score - args.kl_coef * kl.sum(1)
        same = (rollout.group[:, None] == rollout.group[None, :]).float()
        baseline = (same @ seq_reward - seq_reward) / (same.sum(1) - 1).clamp(min=1)
        adv = rollout.returns = (seq_reward - baseline)[:, None] * rollout.mask
        rollout.adv = whiten(adv, rollout.mask, n_proc=n_proc) if args.rloo_whiten else adv.clone()
    mean, std = pooled_moments(torch.stack([kl.sum(1), rollout.score]), n_proc)
    return {"kl": mean[0], "score": mean[1], "score_std": std[1]}


def explained_variance(rollout, n_proc=1):
    """1 - Var(returns - V) / Var(returns) over every rank's valid tokens (a device tensor)."""
    _, (res_std, ret_std) = pooled_moments(torch.stack([rollout.returns - rollout.values, rollout.returns]).flatten(1),
                                           n_proc, rollout.mask.flatten()[None])
    return 1 - res_std ** 2 / (ret_std ** 2).clamp(min=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# A rollout: one iteration's samples as padded [B, T] tensors on the device, built once, sliced by row for
# (micro-)batches. What the host needs (token ids for the reward template and the checker, lengths for the
# micro-batch plans) it keeps from the one read of each generated batch: nothing is read back row by row.


@dataclass
class Rollout:
    response: torch.Tensor   # [B, T] sampled token ids, right-padded with the pad id
    mask: torch.Tensor       # [B, T] 1.0 on response tokens, 0.0 on padding: the one mask everything uses
    stopped: torch.Tensor    # [B] the response ended on a stop token
    score: torch.Tensor      # [B] reward model score (normalised), minus the missing-EOS penalty
    old_logp: torch.Tensor   # [B, T] log pi_old(token), at the sampling temperature
    ref_logp: torch.Tensor   # [B, T] log pi_ref(token)
    values: torch.Tensor     # [B, T] V(prefix before each token), zeros without a critic
    adv: torch.Tensor        # [B, T] advantages (set by compute_advantages)
    returns: torch.Tensor    # [B, T] value targets (set by compute_advantages)
    group: torch.Tensor      # [B] the prompt a row answers (RLOO's leave-one-out groups): its place in the step's
                             #     global batch, the same on any number of processes
    index: list              # per row: its place in the step's global batch (prompt-major, samples of a prompt)
    ids: list                # per row: the response's token ids (host), up to and with its stop token
    segments: list           # per row: the prompt's token segments (device tensors) and image slots
    images: dict             # role -> per row, the prompt's image embeddings for that role's model (constants)
    prompt_len: list         # per row: prompt tokens, image tokens included (for the token budget)
    items: list              # per row: the data row (the world's checker reads it)

    @classmethod
    def start(cls, responses, stopped, pad_id, segments, images, prompt_len, items, group, index=None,
              device=torch.device("cpu")):
        """The rollout of sampled responses (lists of ids), right-padded once and copied to `device` in one pinned
        transfer; each per-token field its own zero tensor until the models have read them. `index` defaults to
        the rows' own order (one process holds the whole batch)."""
        B = len(responses)
        response, lengths = batching.pad_right(responses, pad_id, device)
        T = response.shape[1]
        mask = (torch.arange(T, device=device)[None] < lengths[:, None]).float()
        zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        return cls(response, mask, batching.to_device(torch.tensor(stopped), device), zeros(B), zeros(B, T),
                   zeros(B, T), zeros(B, T), zeros(B, T), zeros(B, T), batching.to_device(torch.tensor(group), device),
                   list(range(B)) if index is None else list(index), [list(r) for r in responses], segments, images,
                   prompt_len, items)

    def __len__(self):
        return len(self.ids)

    def lengths(self):
        """Response tokens per row [B], on the device."""
        return self.mask.sum(1).long()

    def rows(self, idx):
        """The rollout of rows `idx`, its tensors cut to their longest response (known on the host)."""
        idx = list(idx)
        T = max(1, max(len(self.ids[i]) for i in idx))
        at = batching.to_device(torch.tensor(idx), self.mask.device)
        cut = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                cut[f.name] = v[at, :T] if v.dim() == 2 else v[at]
            elif isinstance(v, dict):
                cut[f.name] = {k: [rows[i] for i in idx] for k, rows in v.items()}
            else:
                cut[f.name] = [v[i] for i in idx]
        return replace(self, **cut)


def model_batch(model, rollout, role, device):
    """[left-padded prompt | right-padded response] for `model`, with its own image embeddings (`role`). Without
    padding (every row as long as the others) no attention mask is passed, so SDPA takes its fused causal kernel."""
    rows = model.splice_rows([(seg, [e.to(model.dtype) for e in ims])
                              for seg, ims in zip(rollout.segments, rollout.images[role])])
    prompt = model.pad_batch(rows, left_pad=True)
    response, response_mask = rollout.response, rollout.mask.long()
    padded = len({r[0].shape[0] for r in rows}) > 1 or len({len(r) for r in rollout.ids}) > 1  # host-side shapes
    attention_mask = torch.cat([prompt["attention_mask"], response_mask], 1)
    return {"embeds": torch.cat([prompt["embeds"], model.model.tok_embeddings(response)], 1),
            "im_mask": torch.cat([prompt["im_mask"], torch.zeros_like(response_mask, dtype=torch.bool)], 1),
            "attention_mask": attention_mask if padded else None,
            "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
            "response": response, "P": prompt["embeds"].shape[1]}


def logprobs_of(policy, batch, temperature):
    """log pi(response token | prefix) with logits divided by the sampling temperature (N+ detail), and entropy,
    a chunk of tokens at a time (batching.token_logprobs: the [B, T, V] fp32 tensor never exists whole)."""
    h = policy.model(batch["embeds"], batch["im_mask"], batch["attention_mask"], batch["position_ids"])
    P, T = batch["P"], batch["response"].shape[1]
    return batching.token_logprobs(policy.output, h[:, P - 1:P + T - 1], batch["response"], temperature)


def values_of(critic, batch, norm=(0.0, 1.0)):
    """V(s_t): the critic's score head read at the token before each response token, in the rewards' units:
    (score - mean) / std when the rewards are normalised, so that V and the returns it regresses on agree from the
    first iteration (a raw-scale critic starts std times off, and the value clip slows its correction)."""
    P, T = batch["P"], batch["response"].shape[1]
    v = critic(batch["embeds"], batch["im_mask"], batch["attention_mask"], batch["position_ids"])[:, P - 1:P + T - 1]
    return (v - norm[0]) / norm[1]


class PolicyLogprobs(nn.Module):
    """What DDP / FSDP wrap for the policy (and FSDP for the frozen reference): forward(rollout) -> (log-probs,
    entropy) [B, T]. Splicing reads the token embeddings, so it runs inside the wrapped forward, or DDP would never
    arm their all-reduce and FSDP never gather them."""

    def __init__(self, policy, temperature, device):
        super().__init__()
        self.model, self.temperature, self.device = policy, temperature, device

    def forward(self, rollout):
        batch = model_batch(self.model, rollout, "policy", self.device)
        logp, entropy = logprobs_of(self.model, batch, self.temperature)
        return logp.clone(), entropy  # not a view: FSDP2 hooks its backward on what is returned


class CriticValues(nn.Module):
    """What DDP / FSDP wrap for the critic: forward(rollout) -> V [B, T] in the rewards' units."""

    def __init__(self, critic, norm, device):
        super().__init__()
        self.model, self.norm, self.device = critic, norm, device

    def forward(self, rollout):
        return values_of(self.model, model_batch(self.model, rollout, "critic", self.device), self.norm)


class RewardScore(nn.Module):
    """What FSDP shards for a frozen reward model: forward(rollout) -> its score of each row [B], normalised with
    the held-out statistics when asked; `role` names the rollout's image embeddings for this model."""

    def __init__(self, rm, role, normalize, device):
        super().__init__()
        self.model, self.role, self.normalize, self.device = rm, role, normalize, device

    def forward(self, rollout):
        mean, std = reward_norm(self.model, self.normalize)
        return (self.model.score_embedded(reward_rows(self.model, rollout, self.role, self.device)) - mean) / std


@dataclass
class Roles:
    """The four roles as the objectives the passes call (ppo.train wraps the trained ones for DDP / FSDP and, under
    FSDP, shards the frozen ones); each plain model is its objective's `.model`."""
    policy: nn.Module           # PolicyLogprobs of the policy
    ref: nn.Module              # PolicyLogprobs of the frozen reference
    critic: nn.Module | None    # CriticValues; None for RLOO
    rms: list                   # RewardScore of each frozen reward model, averaged


# the reward template's ending after a response: end-of-turn (added when the response has none), then this
REWARD_SUFFIX = "\n</s>" + data.REWARD_TOKEN


def micro(rollout, rows, budget, n_proc, fsdp, device, extra=0):
    """`rows` of the rollout in micro-batches whose padded batch is at most `budget` tokens wide x tall: a batch is
    max P + max T wide (left-padded prompts, right-padded responses), plus `extra` tokens per row where the
    reward model's rows carry the template's ending. Yields (part, its rows, last of the rank's). Under FSDP every rank runs as
    many micro-batches as the one that needs the most (batching.micro_batches); a rank short of rows runs a
    stand-in row (the rollout's first) with no rows of its own: the caller keeps nothing of it and weighs its loss
    by zero."""
    widths = [(rollout.prompt_len[i], len(rollout.ids[i]) + extra) for i in rows]
    plan = batching.micro_batches(widths, budget, n_proc, fsdp, device)
    for k, part_rows in enumerate(plan):
        idx = [rows[i] for i in part_rows]
        yield rollout.rows(idx or [0]), idx, k == len(plan) - 1


# ----------------------------------------------------------------------------------------------------------------
# 1. Rollout: sample, then score and read every model over the samples


def reward_rows(rm, rollout, role, device):
    """Each row as the reward model reads it: prompt + response under the reward template (its suffix
    `</s>[UNUSED_TOKEN_130]` appended after the response and its end-of-turn), spliced with `role`'s images. The
    continuations reach the device in one pinned copy."""
    tok = rm.tokenizer
    suffix = tok.encode(REWARD_SUFFIX, add_special_tokens=False)
    ends = []
    for resp in rollout.ids:
        # the template's answer ends with end-of-turn: a response that stopped on </s> gets it in its place
        resp = resp[:-1] if resp[-1:] == [tok.eos_id] else resp
        ends.append((resp if resp[-1:] == [tok.eot_id] else resp + [tok.eot_id]) + suffix)
    ends = batching.ids_to_device(ends, device)
    return rm.splice_rows([(seg + [end], [e.to(rm.dtype) for e in ims])
                           for seg, end, ims in zip(rollout.segments, ends, rollout.images[role])])


def reward_scores(rms, rollout, device, normalize):
    """The reward models' scores of every row, averaged (each normalised first when asked)."""
    return sum(RewardScore(rm, f"rm{i}", normalize, device)(rollout) for i, rm in enumerate(rms)) / len(rms)


def sample_seed(seed, step, row):
    """The seed of one response's sampler: a function of the run's seed, the iteration and the row's place in the
    step's global batch only, so that a response does not depend on which rank draws it, on how many ranks there
    are, or on a resume (bon.sample_candidates does the same per candidate)."""
    return random.Random(f"{seed}/{step}/{row}").getrandbits(63)


@torch.no_grad()
def collect_rollouts(roles, prompts, args, device, generators, prompt_index=None):
    """The rollout of `prompts` ((chat prompt, images, row) each): responses sampled with `generators` (response j
    of prompt p from generators[p * n + j], n = --rloo-k for RLOO, else 1), their scores, and the log-probs and
    values of every response token, all on the device. `prompt_index`: each prompt's place in the step's global
    batch (default: its place in `prompts`)."""
    policy, critic = common.unwrap(roles.policy).model, common.unwrap(roles.critic) if roles.critic else None
    for m in (policy, critic.model if critic is not None else None):
        if m is not None:
            m.eval()
    prompt_index = list(range(len(prompts))) if prompt_index is None else prompt_index
    segments, pixels, items, group, index, responses, stopped = sample(common.unwrap(roles.policy), prompts, args,
                                                                       generators, prompt_index)
    # image embeddings are constants during PPO (vision frozen): encoded once per model, kept on the device
    models = {"policy": policy, **({"critic": critic.model} if critic is not None else {}),
              **{rm.role: rm.model for rm in roles.rms}}
    images = {role: [m.encode_images(px) if px else [] for px in pixels] for role, m in models.items()}
    prompt_len = [sum(len(s) for s in seg if not isinstance(s, int)) + sum(e.shape[0] for e in ims)
                  for seg, ims in zip(segments, images["policy"])]
    rollout = Rollout.start(responses, stopped, policy.cfg.pad_token_id, segments_to_device(segments, device),
                            images, prompt_len, items, group, index, device)
    read_rollout(roles, rollout, args, device)
    return rollout


def segments_to_device(segments, device):
    """Every row's token segments as device tensors, in one pinned copy for the whole rollout (image slots stay
    ints): the passes then splice without a host-to-device copy per row and micro-batch."""
    lists = [s for seg in segments for s in seg if not isinstance(s, int)]
    tensors = iter(batching.ids_to_device(lists, device))
    return [[s if isinstance(s, int) else next(tensors) for s in seg] for seg in segments]


def sample(pi, prompts, args, generators, prompt_index):
    """Responses to `prompts`, --rollout-chunk prompts per generation call, as seven per-response lists: prompt
    segments, pixels, data row, the prompt's and the response's places in the step's global batch, token ids up to
    and with the stop token, whether it stopped. Each generation call's tokens come back to the host in one read.

    Under FSDP the sampler is a whole copy of the policy (in the autocast dtype), gathered once here and freed on
    return, i.e. before the update: decoding then runs no collective at all (docs/scale.md, "PPO at 7B (FSDP)")."""
    policy, device = pi.model, pi.device
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    sampler = common.unsharded_copy(policy, amp) if common.sharded(pi) else policy
    n = args.rloo_k if args.algo == "rloo" else 1
    segments, pixels, items, group, index, responses, stopped = [], [], [], [], [], [], []
    stop = {policy.tokenizer.eos_id, policy.tokenizer.eot_id}
    for c in range(0, len(prompts), args.rollout_chunk):
        chunk = prompts[c:c + args.rollout_chunk]
        seqs = [sampler.sequence(prompt, ims, args.hd_num) for prompt, ims, _ in chunk]
        batch = sampler.embed_batch(seqs, left_pad=True)
        out = sampler.generate(batch["embeds"], batch["im_mask"], batch["attention_mask"], args.max_new_tokens,
                               args.temperature, args.top_p, generator=generators[c * n:(c + len(chunk)) * n], n=n)
        for j, row in enumerate(out.tolist()):
            end = next((t + 1 for t, tok in enumerate(row) if tok in stop), None)
            segments.append(seqs[j // n][0])
            pixels.append(seqs[j // n][1])
            items.append(chunk[j // n][2])
            group.append(prompt_index[c + j // n])
            index.append(prompt_index[c + j // n] * n + j % n)
            responses.append(row[:end] if end else row)
            stopped.append(end is not None)
    return segments, pixels, items, group, index, responses, stopped


def read_rollout(roles, rollout, args, device):
    """Fill in the rollout's score (the reward models' mean, minus --missing-eos-penalty where no stop token came)
    and, per response token, log pi_old, log pi_ref and V, over micro-batches of --token-budget tokens, on the
    device."""
    pi, ref, critic = common.unwrap(roles.policy), roles.ref, common.unwrap(roles.critic) if roles.critic else None
    n_proc = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # the reward model's rows are the widest: the template's ending and an end-of-turn after each response
    extra = len(roles.rms[0].model.tokenizer.encode(REWARD_SUFFIX, add_special_tokens=False)) + 1

    def run(objective, part):  # FSDP: the root gathered for one forward only, one model's at a time
        out = objective(part)
        common.release(objective)
        return out[0] if isinstance(out, tuple) else out

    for part, rows, _ in micro(rollout, list(range(len(rollout))), args.token_budget, n_proc, common.sharded(pi),
                               device, extra):
        t = part.response.shape[1]
        out = (sum(run(rm, part) for rm in roles.rms) / len(roles.rms), run(pi, part), run(ref, part),
               run(critic, part) if critic is not None else None)
        if rows:
            at = batching.to_device(torch.tensor(rows), device)
            rollout.score[at] = out[0].float()
            rollout.old_logp[at, :t], rollout.ref_logp[at, :t] = out[1].float(), out[2].float()
            if critic is not None:
                rollout.values[at, :t] = out[3].float()
    rollout.score -= args.missing_eos_penalty * (~rollout.stopped).float()
    for name in ("old_logp", "ref_logp", "values"):
        getattr(rollout, name).mul_(rollout.mask)


# ----------------------------------------------------------------------------------------------------------------
# 4. The update: K epochs of the clipped losses over shuffled mini-batches


def ppo_update(fwd_pi, fwd_v, rollout, opt_pi, opt_v, args, device, n_proc, amp=contextlib.nullcontext):
    """--ppo-epochs passes over --mini-batches shuffled mini-batches, each one optimizer step of the policy (Eq. 3)
    and the critic (Eq. 4), accumulated over micro-batches that fit --token-budget. Losses are token means over
    the whole mini-batch, all ranks included. fwd_pi / fwd_v are PolicyLogprobs / CriticValues (fwd_v None for
    RLOO), wrapped for DDP or FSDP under torchrun. Returns token means of the losses and diagnostics as device
    tensors: nothing is read back to the host here."""
    stats = {}   # name -> [sum over valid tokens, count], device tensors: token means over the whole update

    def log_mean(name, x, mask):
        total = stats.setdefault(name, [0.0, 0.0])
        total[0] = total[0] + (x * mask).sum().double()
        total[1] = total[1] + mask.sum().double()

    for minibatches in shuffled_minibatches(rollout, args, n_proc):  # one list per epoch
        for minibatch in minibatches:
            at = batching.to_device(torch.tensor(minibatch, dtype=torch.long), device)
            n_tok = common.sum_over_ranks(rollout.mask[at].sum(), n_proc)  # the whole mini-batch's tokens
            for part, rows, last in micro(rollout, minibatch, args.token_budget, n_proc, common.sharded(fwd_pi),
                                          device):
                mask, adv = part.mask * bool(rows), part.adv
                # policy and critic share no parameter: a backward each equals one of the summed losses, and only
                # one model's activations are alive at a time. DDP / FSDP average the ranks' gradients: * n_proc
                with common.no_sync_unless(last, fwd_pi), amp():
                    logp, entropy = fwd_pi(part)
                    log_ratio = (logp - part.old_logp) * mask  # 0 on padding: a ratio of 1
                    ratio = log_ratio.exp()
                    pg = policy_loss(ratio, adv, args.clip_ratio)
                    ((pg * mask).sum() * n_proc / n_tok).backward()
                if fwd_v is not None:
                    with common.no_sync_unless(last, fwd_v), amp():
                        v = fwd_v(part)
                        vf = value_loss(v, part.values, part.returns, args.value_clip)
                        ((vf * mask).sum() * n_proc / n_tok).backward()
                    with torch.no_grad():
                        log_mean("value_loss", vf, mask)
                        log_mean("value_clipfrac", ((v - part.values).abs() > args.value_clip).float(), mask)
                with torch.no_grad():
                    log_mean("policy_loss", pg, mask)
                    log_mean("entropy", entropy, mask)
                    log_mean("approx_kl", (ratio - 1) - log_ratio, mask)  # Schulman k3
                    log_mean("clipfrac", ((ratio - 1).abs() > args.clip_ratio).float(), mask)
                    log_mean("ratio", ratio, mask)
            for fwd, opt in ((fwd_pi, opt_pi), (fwd_v, opt_v)):
                if fwd is not None:
                    common.clip_and_step([p for p in fwd.parameters() if p.requires_grad], opt, args.clip)
    names = sorted(stats)
    totals = common.sum_over_ranks(torch.stack([torch.stack(stats[k]) for k in names]), n_proc)
    return {k: total / n.clamp(min=1.0) for k, (total, n) in zip(names, totals)}


def shuffled_minibatches(rollout, args, n_proc):
    """For each of --ppo-epochs, --mini-batches (sizes within one) cut from a shuffle of the step's global batch, as
    this rank's rows of each (possibly none): the rows one process would put in them. Every rank's Python RNG is
    seeded and drawn alike, so all shuffle alike; the global batch's size is the sum of the ranks' (one read)."""
    rows = rollout.index if n_proc > 1 else list(range(len(rollout)))  # one process: the rows as they are
    local = {g: i for i, g in enumerate(rows)}
    order = list(range(int(common.sum_over_ranks(torch.tensor(len(rollout)), n_proc))))
    n_mb = min(args.mini_batches, len(order))
    cuts = [round(i * len(order) / n_mb) for i in range(n_mb + 1)]
    epochs = []
    for _ in range(args.ppo_epochs):
        random.shuffle(order)
        epochs.append([[local[g] for g in order[m0:m1] if g in local] for m0, m1 in zip(cuts, cuts[1:])])
    return epochs


# ----------------------------------------------------------------------------------------------------------------
# The loop (train.py --stage ppo calls it)


def train(args, rank, n_proc, device):
    """--steps iterations of: rollout -> rewards with the KL penalty -> GAE (Eq. 2) -> K epochs of the clipped
    policy (Eq. 3) and value (Eq. 4) losses. Returns the summary (None when --stop-after stopped the run)."""
    out = common.prepare_out(args.out, args.resume, rank)
    fsdp = args.fsdp and n_proc > 1
    amp = common.autocast(device, args.autocast, cache=False)  # the rollout runs four models without a backward
    if not args.rm:
        raise SystemExit("error: --stage ppo needs --rm DIR (train one with: torchrun train.py --stage rm --out DIR)")
    if args.top_p < 1:
        raise SystemExit(f"error: --top-p {args.top_p}: PPO and RLOO sample from the full softmax (--top-p 1), the "
                         f"distribution their ratio and KL are computed on")
    policy = trained(InternLMXComposer2.from_pretrained(args.init or WORLD_SFT, device=device), args)
    prompts, held = ppo_prompts(args)
    summary = start_summary(args, out, rank, n_proc, fsdp, policy, held)  # before wrapping: rank 0 holds it whole
    roles = load_roles(args, policy, n_proc, device, rank)
    fwd_pi, fwd_v = roles.policy, roles.critic
    critic = common.unwrap(fwd_v).model if fwd_v is not None else None
    critic_lr = args.critic_lr or 5 * args.lr
    # after wrapping: FSDP replaces the parameters by their shards
    opt_pi = common.make_optimizer(policy, args.lr, args.weight_decay, args.beta2)
    opt_v = common.make_optimizer(critic, critic_lr, args.weight_decay, args.beta2) if critic is not None else None
    run = common.Run(args, out, rank, n_proc, policy, opt_pi, CURVES, f"PPO ({args.algo})",
                     parts=[("critic", critic, opt_v)], xlabel="PPO iteration")  # resumes both under --resume
    per_prompt = args.rloo_k if args.algo == "rloo" else 1
    t0, tokens_done, stats = time.time(), 0, None
    while run.step < args.steps:
        step = run.step
        checked = check_heldout(policy, held, args, step, rank, fsdp)  # the gold score, before this iteration
        mine, index = step_prompts(prompts, args, step, rank, n_proc)
        # one generator per response, seeded by its place in the global batch: resume and process count change
        # nothing
        generators = [torch.Generator(device).manual_seed(sample_seed(args.seed, step, g * per_prompt + j))
                      for g in index for j in range(per_prompt)]
        t_roll = time.time()
        # 1. rollout: responses, their scores, and log-probs / values of every response token
        with amp():
            rollout = collect_rollouts(roles, mine, args, device, generators, index)
        # 2-3. rewards with the KL penalty, and advantages (GAE, Eq. 2; or RLOO's leave-one-out baseline)
        stats = compute_advantages(rollout, args, n_proc)
        t_roll = time.time() - t_roll
        # 4. K epochs of the clipped policy (Eq. 3) and value (Eq. 4) losses over shuffled mini-batches
        lr = common.lr_at(step, args.lr, args.steps, args.warmup)
        common.set_lr(opt_pi, lr)
        if opt_v is not None:
            common.set_lr(opt_v, lr * critic_lr / args.lr)
        for m in (policy, critic):  # train mode: --grad-ckpt checkpoints only in training forwards
            if m is not None:
                m.train()
        stats.update(ppo_update(fwd_pi, fwd_v, rollout, opt_pi, opt_v, args, device, n_proc, amp))
        run.step = step = step + 1
        tokens_done += sum(map(len, rollout.ids))
        stats.update(response_length=rollout.mask.sum() / len(rollout), eos_rate=rollout.stopped.float().mean())
        if critic is not None:
            stats["explained_variance"] = explained_variance(rollout, n_proc)
        if held:  # the checker reads the token ids the host already holds
            answers = [policy.decode_answer(ids) for ids in rollout.ids]
            stats["train_accuracy"] = sum(map(checker.is_correct, rollout.items, answers)) / len(rollout)
        stats = read_stats(stats, n_proc)
        stats.update(step=step, tokens_per_s=tokens_done * n_proc / (time.time() - t0), rollout_s=t_roll)
        log_iteration(out, stats, checked, args, rank)
        if run.save_evaluate_or_stop(lambda: {}):  # the held-out checks run at an iteration's start, above
            return None
    # FSDP: every rank gathers a whole copy for the held-out evaluation (rank 0 runs it)
    return finish(run, common.unsharded_copy(policy) if fsdp and held else policy, held, summary, stats)


def read_stats(stats, n_proc):
    """The iteration's statistics (device tensors and floats) as floats, averaged over the ranks (equal shares; the
    pooled ones are equal on every rank already): one collective, one read back to the host."""
    names = sorted(stats)
    values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).to(stats["kl"].device) for k in names])
    return dict(zip(names, (common.sum_over_ranks(values, n_proc) / n_proc).tolist()))


def start_summary(args, out, rank, n_proc, fsdp, policy, held):
    """The run's summary, with the checker's verdict on the starting policy (written now: kept across a resume)."""
    summary = {"stage": "ppo", "algo": args.algo, "processes": n_proc, "fsdp": fsdp, "seed": args.seed,
               "kl_coef": args.kl_coef}
    if held and rank == 0 and not args.resume:
        summary.update(checker.tagged(checker.eval_policy(policy, held, args.hd_num), "before"))
        common.log(rank, f"held-out greedy accuracy before: {summary['accuracy_before']:.3f}")
        data.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def check_heldout(policy, held, args, step, rank, fsdp):
    """Every --eval-every iterations, the checker's verdict on this policy's greedy held-out answers: the gold score
    of Gao et al.'s over-optimisation curve. FSDP: every rank gathers a whole copy, rank 0 evaluates."""
    if not (held and args.eval_every and step % args.eval_every == 0):
        return None
    judged = common.unsharded_copy(policy) if fsdp else policy
    return checker.eval_policy(judged, held, args.hd_num) if rank == 0 else None


def log_iteration(out, stats, checked, args, rank):
    """One line printed and one in metrics.jsonl for the iteration, and the held-out check made at its start,
    beside this iteration's KL and score (the same policy sampled them)."""
    if rank != 0:
        return
    print(f"iter {stats['step']}/{args.steps} score {stats['score']:+.3f} kl {stats['kl']:.3f} len "
          f"{stats['response_length']:.1f} eos {stats['eos_rate']:.2f} pg {stats['policy_loss']:+.4f} "
          + (f"vf {stats['value_loss']:.4f} ev {stats['explained_variance']:+.2f} " if "value_loss" in stats else "")
          + f"clip {stats['clipfrac']:.3f} akl {stats['approx_kl']:.4f} ent {stats['entropy']:.3f}"
          + (f" acc {stats['train_accuracy']:.3f}" if "train_accuracy" in stats else ""), flush=True)
    common.append_jsonl(out / "metrics.jsonl", stats)
    if checked is not None:
        common.append_jsonl(out / "metrics.jsonl", {"step": stats["step"] - 1, "phase": "start", "kl": stats["kl"],
                                                    "score": stats["score"],
                                                    **{"heldout_" + k: v for k, v in checked.items()}})


def trained(model, args):
    """A policy or critic as PPO trains it: vision path and separators frozen (image embeddings are rollout
    constants), the decoder checkpointed under --grad-ckpt."""
    model.model.gradient_checkpointing = args.grad_ckpt
    for p in [*model.vit.parameters(), *model.vision_proj.parameters(), model.plora_glb_GN, model.plora_sub_GN]:
        p.requires_grad_(False)
    return model


def load_roles(args, policy, n_proc, device, rank=0):
    """The objectives of the four roles around `policy` (loaded from --init): the frozen reference from --init, the
    frozen reward model(s) and, for PPO, the critic from --rm. The reference is held in the policy's dtype, so that
    under autocast both compute through the same casts and the first iteration's ratio is 1 and its KL 0 exactly;
    the reward models in bf16 under autocast (whose matmuls round their weights to bf16 anyway). DDP for the
    trained ones under torchrun; with --fsdp every model's decoder sharded, the frozen ones' too, each right after
    it is loaded: at 7B no GPU holds two of them whole."""
    rm_dtype = torch.bfloat16 if common.autocast_on(device, args.autocast) else torch.float32
    load = lambda cls, path, **kw: cls.from_pretrained(path, device=device, **kw)  # noqa: E731
    frozen = lambda cls, path, dtype: load(cls, path, dtype=dtype).requires_grad_(False)  # noqa: E731
    pi = common.wrap(PolicyLogprobs(policy, args.temperature, device), n_proc, args.fsdp)
    ref = common.shard_frozen(PolicyLogprobs(frozen(InternLMXComposer2, args.init or WORLD_SFT, policy.dtype),
                                             args.temperature, device), n_proc, args.fsdp)
    rms = [common.shard_frozen(RewardScore(frozen(RewardModel, d, rm_dtype), f"rm{i}", args.normalize_reward,
                                           device), n_proc, args.fsdp) for i, d in enumerate(args.rm)]
    for d, rm in zip(args.rm, rms):
        if args.normalize_reward and rm.model.cfg.reward_mean is None:
            common.log(rank, f"note: {d} stored no held-out reward statistics (the RM stage stores them when it has "
                             f"held-out pairs): its scores are used as they are, not normalised")
    critic = None
    if args.algo == "ppo":
        model = trained(load(RewardModel, args.rm[0]), args)
        critic = common.wrap(CriticValues(model, reward_norm(model, args.normalize_reward), device), n_proc,
                             args.fsdp)
    return Roles(pi, ref, critic, rms)


def step_prompts(prompts, args, step, rank, n_proc):
    """This rank's prompts of iteration `step` and their places in the step's global batch: a draw of --batch
    prompts (RLOO: a k-th of them, k samples each: the same number of responses), dealt to the ranks in turn."""
    per_rank = args.batch // n_proc
    if args.algo == "rloo":
        per_rank = max(1, per_rank // args.rloo_k)
    drawn = random.Random(args.seed + step).sample(prompts, args.batch)[:per_rank * n_proc]
    index = list(range(rank, len(drawn), n_proc))
    return [drawn[g] for g in index], index


def ppo_prompts(args):
    """(chat prompt with its history, images, row) for every fine-tuning row, and the world's held-out prompts."""
    if args.data:
        rows, held = data.read_sft(args.data), []
    else:
        files = store.ensure_world(args.world_dir)
        rows, held = data.read_sft(files["sft_train"]), store.heldout_items(files["heldout_prompts"])
    return [(data.sft_prompt(r), r["images"], r) for r in rows], held


# the learning curves PPO draws (figures.write_curves), against the iteration
CURVES = ["score", "kl", "train_accuracy", "value_loss", "entropy", "response_length"]


def finish(run, policy, held, summary, stats):
    """summary.json (held-out accuracy before and after, the last KL), curves.svg and overoptimisation.svg."""
    args, out, rank = run.a, run.out, run.rank
    # the logged iterations (not the held-out checks): a resumed finished run's last KL, and on rank 0 the README's
    # KL, the mean over the last 20 iterations, steadier than the last one
    iterations = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "phase" not in m] \
        if rank == 0 or stats is None else []
    summary["kl"] = stats["kl"] if stats is not None else iterations[-1]["kl"]
    if iterations:
        summary["kl_last_20"] = sum(m["kl"] for m in iterations[-20:]) / len(iterations[-20:])
    if held and rank == 0:
        summary.update(checker.tagged(checker.eval_policy(policy, held, args.hd_num), "after"))
        if "accuracy_before" not in summary:  # measured before a resume, in the summary written then
            before = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
            summary.update({k: v for k, v in before.items() if "_before" in k})
    summary = run.finish(summary)
    if rank == 0 and held and args.eval_every:  # the held-out checks, from step 0 on
        data.atomic_write_text(out / "overoptimisation.svg", figures.overoptimisation_svg([out]))
    return summary
