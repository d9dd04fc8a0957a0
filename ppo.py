"""PPO (and critic-free RLOO) for a multimodal chat policy, rewarded by IXC-2.5-Reward.

    torchrun --standalone --nproc_per_node 2 train.py --stage ppo     # the built-in world, against runs/rm

Four roles (paper §3.3; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"): the policy (trained),
a frozen reference copy of it, the frozen reward model, and the critic, initialised from the reward model and read
at every response token. One iteration of `train`: 1. sample responses and score them (`collect_rollouts`); 2.
per-token rewards with a KL penalty and 3. GAE, Eq. 2 (`compute_advantages`); 4. K epochs of the clipped policy (Eq.
3, `policy_loss`) and value (Eq. 4, `value_loss`) losses over shuffled mini-batches (`ppo_update`). The equations
are pure functions of tensors (next section); the rest moves rows between models and processes.

Padding contract (`Rollout`, `model_batch`): prompts left-padded, responses right-padded after them, position ids
count real tokens only, masks come from lengths (a pad id equal to a stop token changes nothing), the score sits on
the last real response token. A prompt is held as `segments`, model.splice's input: a list whose items are either
token ids (a list) or an image's index (an int), whose embeddings go in that place.

Under torchrun each of the `n_proc` processes samples its share of the prompts, while statistics and mini-batches
are the whole batch's, so any number of processes trains as one; FSDP all-gathers every layer in each forward, so
the ranks must run equally many forwards, which `lockstep` arranges.
"""
import argparse
import contextlib
import json
import random
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

import common
import data
import figures
from world import WORLD_SFT, checker, store
from model import InternLMXComposer2
from reward import RewardModel


def add_args(p):
    """PPO hyper-parameters; defaults follow TRL / the N+ details (gamma 1, lambda 0.95, clip 0.2, k1 KL). Returns
    the names of the flags only this stage reads."""
    g = p.add_argument_group("ppo")
    g.add_argument("--algo", choices=["ppo", "rloo"], default="ppo", help="rloo: critic-free, leave-one-out baseline")
    g.add_argument("--kl-coef", type=float, help="beta of the per-token KL penalty in the reward (default: TRL's 0.05; "
                   "the world: 0.1, chosen from its over-optimisation curve)")
    g.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1",
                   help="per-token KL: k1 log-ratio, k3 Schulman's")
    g.add_argument("--gamma", type=float, default=1.0, help="GAE discount (Eq. 2)")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda (Eq. 2)")
    g.add_argument("--clip-ratio", type=float, default=0.2, help="policy ratio clip epsilon (Eq. 3)")
    g.add_argument("--value-clip", type=float, default=0.2, help="value clip around the rollout's values (Eq. 4)")
    g.add_argument("--critic-lr", type=float, help="default: 5 x the policy lr")
    g.add_argument("--ppo-epochs", type=data.positive_int, default=2, help="passes over each rollout (K)")
    g.add_argument("--mini-batches", type=data.positive_int, default=2, help="optimizer steps per pass")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use it too)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    g.add_argument("--max-new-tokens", type=data.positive_int, default=48, help="response length cap")
    g.add_argument("--missing-eos-penalty", type=float, default=1.0, help="subtracted when no stop token came")
    g.add_argument("--normalize-reward", action=argparse.BooleanOptionalAction, default=True,
                   help="(score - mean) / std with the held-out statistics the RM stage stored in its config")
    g.add_argument("--rloo-k", type=data.positive_int, default=4, help="rloo: samples per prompt")
    g.add_argument("--rollout-chunk", type=data.positive_int, default=32, help="prompts per generation call")
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


def compute_advantages(ro, a, n_proc=1):
    """PPO: per-token rewards -beta * KL with the score added on the last real token, GAE (Eq. 2), whitened
    advantages. RLOO: the sequence reward minus the mean of the other samples of the same prompt, on every token."""
    kl = kl_penalty(ro.old_logp, ro.ref_logp, a.kl_estimator) * ro.mask
    if a.algo == "ppo":
        rewards = -a.kl_coef * kl  # 2. the KL penalty on every token, the reward model's score on the last
        rewards[torch.arange(len(ro)), ro.lengths() - 1] += ro.score
        adv, ro.returns = gae(rewards, ro.values, ro.mask, a.gamma, a.lam)  # 3. GAE against the critic's values
    else:
        seq_reward = ro.score - a.kl_coef * kl.sum(1)
        same = (ro.group[:, None] == ro.group[None, :]).float()
        baseline = (same @ seq_reward - seq_reward) / (same.sum(1) - 1).clamp(min=1)
        adv = ro.returns = (seq_reward - baseline)[:, None] * ro.mask
    ro.adv = whiten(adv, ro.mask, n_proc=n_proc)
    mean, std = pooled_moments(torch.stack([kl.sum(1), ro.score]), n_proc)
    return {"kl": mean[0].item(), "score": mean[1].item(), "score_std": std[1].item()}


def explained_variance(ro, n_proc=1):
    """1 - Var(returns - V) / Var(returns) over every rank's valid tokens."""
    _, (res_std, ret_std) = pooled_moments(torch.stack([ro.returns - ro.values, ro.returns]).flatten(1), n_proc,
                                           ro.mask.flatten()[None])
    return (1 - res_std ** 2 / (ret_std ** 2).clamp(min=1e-8)).item()


# ----------------------------------------------------------------------------------------------------------------
# A rollout: one iteration's samples as padded [B, T] tensors, built once, sliced by row for (micro-)batches


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
    index: torch.Tensor      # [B] the row's place in the step's global batch (prompt-major, samples of a prompt)
    segments: list           # per row: the prompt's token segments and image slots
    images: dict             # role -> per row, the prompt's image embeddings for that role's model (constants)
    prompt_len: list         # per row: prompt tokens, image tokens included (for the token budget)
    items: list              # per row: the data row (the world's checker reads it)

    @classmethod
    def start(cls, responses, stopped, pad_id, segments, images, prompt_len, items, group, index=None):
        """The rollout of sampled responses (lists of ids), right-padded here once; the per-token fields zero until
        the models have read them. `index` defaults to the rows' own order (one process holds the whole batch)."""
        B, T = len(responses), max(map(len, responses))
        response, mask = torch.full((B, T), pad_id, dtype=torch.long), torch.zeros(B, T)
        for b, r in enumerate(responses):
            response[b, :len(r)], mask[b, :len(r)] = torch.tensor(r, dtype=torch.long), 1.0
        zeros = torch.zeros(B, T)
        index = torch.arange(B) if index is None else torch.tensor(index)
        return cls(response, mask, torch.tensor(stopped), torch.zeros(B), zeros, zeros, zeros, zeros, zeros,
                   torch.tensor(group), index, segments, images, prompt_len, items)

    def __len__(self):
        return len(self.segments)

    def lengths(self):
        return self.mask.sum(1).long()

    def rows(self, idx):
        """The rollout of rows `idx`, its tensors cut to their longest response."""
        idx = list(idx)
        T = max(1, int(self.lengths()[idx].max()))
        cut = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                cut[f.name] = v[idx, :T] if v.dim() == 2 else v[idx]
            elif isinstance(v, dict):
                cut[f.name] = {k: [rows[i] for i in idx] for k, rows in v.items()}
            else:
                cut[f.name] = [v[i] for i in idx]
        return replace(self, **cut)


def model_batch(model, ro, role, device):
    """[left-padded prompt | right-padded response] for `model`, with its own image embeddings (`role`)."""
    # a frozen model held in bf16 reads the policy's fp32 image embeddings (the reference shares its vision path)
    rows = [model.splice(seg, [e.to(device, model.dtype, non_blocking=True) for e in ims])
            for seg, ims in zip(ro.segments, ro.images[role])]
    prompt = model.pad_batch(rows, left_pad=True)
    response, resp_mask = ro.response.to(device), ro.mask.to(device).long()
    attention_mask = torch.cat([prompt["attention_mask"], resp_mask], 1)
    return {"embeds": torch.cat([prompt["embeds"], model.model.tok_embeddings(response)], 1),
            "im_mask": torch.cat([prompt["im_mask"], torch.zeros_like(resp_mask, dtype=torch.bool)], 1),
            "attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
            "response": response, "P": prompt["embeds"].shape[1]}


def logprobs_of(policy, batch, temperature):
    """log pi(response token | prefix) with logits divided by the sampling temperature (N+ detail), and entropy."""
    h = policy.model(batch["embeds"], batch["im_mask"], batch["attention_mask"], batch["position_ids"])
    P, T = batch["P"], batch["response"].shape[1]
    logits = policy.output(h[:, P - 1:P + T - 1]).float() / max(temperature, 1e-6)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, batch["response"][..., None]).squeeze(-1), entropy


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

    def forward(self, ro):
        logp, entropy = logprobs_of(self.model, model_batch(self.model, ro, "policy", self.device), self.temperature)
        return logp.clone(), entropy  # not a view of the log-softmax: FSDP2 hooks its backward on what is returned


class CriticValues(nn.Module):
    """What DDP / FSDP wrap for the critic: forward(rollout) -> V [B, T] in the rewards' units."""

    def __init__(self, critic, norm, device):
        super().__init__()
        self.model, self.norm, self.device = critic, norm, device

    def forward(self, ro):
        return values_of(self.model, model_batch(self.model, ro, "critic", self.device), self.norm)


class RewardScore(nn.Module):
    """What FSDP shards for a frozen reward model: forward(rollout) -> its score of each row [B], normalised with
    the held-out statistics when asked; `role` names the rollout's image embeddings for this model."""

    def __init__(self, rm, role, normalize, device):
        super().__init__()
        self.model, self.role, self.normalize, self.device = rm, role, normalize, device

    def forward(self, ro):
        mean, std = reward_norm(self.model, self.normalize)
        return (self.model.score_embedded(reward_rows(self.model, ro, self.role, self.device)) - mean) / std


@dataclass
class Roles:
    """The four roles as the objectives the passes call (ppo.train wraps the trained ones for DDP / FSDP and, under
    FSDP, shards the frozen ones); each plain model is its objective's `.model`."""
    policy: nn.Module           # PolicyLogprobs of the policy
    ref: nn.Module              # PolicyLogprobs of the frozen reference
    critic: nn.Module | None    # CriticValues; None for RLOO
    rms: list                   # RewardScore of each frozen reward model, averaged


def reward_norm(rm, normalize):
    return (rm.cfg.reward_mean, rm.cfg.reward_std) if normalize else (0.0, 1.0)


def lockstep(ro, rows, budget, n_proc, fsdp, device):
    """`rows` of the rollout in micro-batches of at most `budget` padded tokens, as (part, its rows, last of the
    rank's). Under FSDP every forward all-gathers each layer, so every rank runs as many micro-batches as the one
    that needs the most (common.micro_batches); a rank short of rows runs a stand-in row (the rollout's first) with
    no rows of its own: the caller keeps nothing of it and weighs its loss by zero."""
    lengths = (ro.lengths()[rows] + torch.tensor([ro.prompt_len[i] for i in rows], dtype=torch.long)).tolist()
    micro = common.micro_batches(lengths, budget, n_proc, fsdp, device)
    for k, mi in enumerate(micro):
        idx = [rows[i] for i in mi]
        yield ro.rows(idx or [0]), idx, k == len(micro) - 1


# ----------------------------------------------------------------------------------------------------------------
# 1. Rollout: sample, then score and read every model over the samples


def reward_rows(rm, ro, role, device):
    """Each row as the reward model reads it: prompt + response under the reward template (its suffix
    `</s>[UNUSED_TOKEN_130]` appended after the response and its end-of-turn), spliced with `role`'s images."""
    tok = rm.tokenizer
    suffix = tok.encode("\n</s>" + data.REWARD_TOKEN, add_special_tokens=False)
    rows = []
    for b in range(len(ro)):
        resp = ro.response[b, :int(ro.mask[b].sum())].tolist()
        # the template's answer ends with end-of-turn: a response that stopped on </s> gets it in its place
        resp = resp[:-1] if ro.stopped[b] and resp[-1:] == [tok.eos_id] else resp
        resp = resp if resp[-1:] == [tok.eot_id] else resp + [tok.eot_id]
        rows.append(rm.splice(ro.segments[b] + [resp + suffix], [e.to(device, rm.dtype) for e in ro.images[role][b]]))
    return rows


def reward_scores(rms, ro, device, normalize):
    """The reward models' scores of every row, averaged (each normalised first when asked)."""
    return sum(RewardScore(rm, f"rm{i}", normalize, device)(ro) for i, rm in enumerate(rms)) / len(rms)


def sample_seed(seed, step, row):
    """The seed of one response's sampler: a function of the run's seed, the iteration and the row's place in the
    step's global batch only, so that a response does not depend on which rank draws it, on how many ranks there
    are, or on a resume (bon.sample_candidates does the same per candidate)."""
    return random.Random(f"{seed}/{step}/{row}").getrandbits(63)


@torch.no_grad()
def collect_rollouts(roles, prompts, a, device, generators, prompt_index=None):
    """The rollout of `prompts` ((chat prompt, images, row) each): responses sampled with `generators` (response j
    of prompt p from generators[p * n + j], n = --rloo-k for RLOO, else 1), their scores, and the log-probs and
    values of every response token. `prompt_index`: each prompt's place in the step's global batch (default: its
    place in `prompts`)."""
    policy, critic = common.unwrap(roles.policy).model, common.unwrap(roles.critic) if roles.critic else None
    for m in (policy, critic.model if critic is not None else None):
        if m is not None:
            m.eval()
    prompt_index = list(range(len(prompts))) if prompt_index is None else prompt_index
    segments, pixels, items, group, index, responses, stopped = sample(common.unwrap(roles.policy), prompts, a,
                                                                       generators, prompt_index)
    # image embeddings are constants during PPO (vision frozen): encode once per model, keep them on the host
    models = {"policy": policy, **({"critic": critic.model} if critic is not None else {}),
              **{rm.role: rm.model for rm in roles.rms}}
    images = {role: [[e.cpu() for e in m.encode_images(px)] if px else [] for px in pixels]
              for role, m in models.items()}
    prompt_len = [sum(len(s) for s in seg if not isinstance(s, int)) + sum(e.shape[0] for e in ims)
                  for seg, ims in zip(segments, images["policy"])]
    ro = Rollout.start(responses, stopped, policy.cfg.pad_token_id, segments, images, prompt_len, items, group, index)
    read_rollout(roles, ro, a, device)
    return ro


def sample(pi, prompts, a, generators, prompt_index):
    """Responses to `prompts`, --rollout-chunk prompts per generation call, as seven per-response lists: prompt
    segments, pixels, data row, the prompt's and the response's places in the step's global batch, token ids up to
    and with the stop token, whether it stopped.

    Under FSDP the sampler is a whole copy of the policy (in the autocast dtype), gathered once here and freed on
    return, i.e. before the update: decoding then runs no collective at all, so ranks whose responses stop at
    different steps never wait for one another (docs/scale.md, "PPO at 7B (FSDP)", has the measurement behind this
    choice)."""
    policy, device = pi.model, pi.device
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    sampler = common.unsharded_copy(policy, amp) if common.sharded(pi) else policy
    n = a.rloo_k if a.algo == "rloo" else 1
    segments, pixels, items, group, index, responses, stopped = [], [], [], [], [], [], []
    stop = {policy.tokenizer.eos_id, policy.tokenizer.eot_id}
    for c in range(0, len(prompts), a.rollout_chunk):
        chunk = prompts[c:c + a.rollout_chunk]
        seqs = [sampler.sequence(prompt, ims, a.hd_num) for prompt, ims, _ in chunk]
        batch = sampler.embed_batch(seqs, left_pad=True)
        out = sampler.generate(batch["embeds"], batch["im_mask"], batch["attention_mask"], a.max_new_tokens,
                               a.temperature, a.top_p, generator=generators[c * n:(c + len(chunk)) * n], n=n)
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


def read_rollout(roles, ro, a, device):
    """Fill in the rollout's score (the reward models' mean, minus --missing-eos-penalty where no stop token came)
    and, per response token, log pi_old, log pi_ref and V, over micro-batches of --token-budget tokens."""
    pi, ref, critic = common.unwrap(roles.policy), roles.ref, common.unwrap(roles.critic) if roles.critic else None
    n_proc = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    B, T = ro.response.shape
    score, old_logp, ref_logp, values = torch.zeros(B), torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)

    def run(objective, part):  # FSDP: the root gathered for one forward only, one model's at a time
        out = objective(part)
        common.release(objective)
        return out[0] if isinstance(out, tuple) else out

    for part, mi, _ in lockstep(ro, list(range(B)), a.token_budget, n_proc, common.sharded(pi), device):
        t = part.response.shape[1]
        out = (sum(run(rm, part) for rm in roles.rms) / len(roles.rms), run(pi, part), run(ref, part),
               run(critic, part) if critic is not None else None)
        if mi:
            score[mi] = out[0].float().cpu()
            old_logp[mi, :t], ref_logp[mi, :t] = out[1].cpu(), out[2].cpu()
            if critic is not None:
                values[mi, :t] = out[3].float().cpu()
    ro.score = score - a.missing_eos_penalty * (~ro.stopped).float()
    ro.old_logp, ro.ref_logp, ro.values = old_logp * ro.mask, ref_logp * ro.mask, values * ro.mask


# ----------------------------------------------------------------------------------------------------------------
# 4. The update: K epochs of the clipped losses over shuffled mini-batches


def ppo_update(fwd_pi, fwd_v, ro, opt_pi, opt_v, a, device, n_proc, amp=contextlib.nullcontext):
    """--ppo-epochs passes over --mini-batches shuffled mini-batches, each one optimizer step of the policy (Eq. 3)
    and the critic (Eq. 4), accumulated over micro-batches that fit --token-budget. Losses are token means over
    the whole mini-batch, all ranks included. fwd_pi / fwd_v are PolicyLogprobs / CriticValues (fwd_v None for
    RLOO), wrapped for DDP or FSDP under torchrun. Returns token means of the losses and diagnostics."""
    stats = {}   # name -> [sum over valid tokens, count]: token means over the whole update, all ranks

    def log_mean(name, x, mask):
        total = stats.setdefault(name, [0.0, 0.0])
        total[0] += (x * mask).sum().item()
        total[1] += mask.sum().item()

    for minibatches in shuffled_minibatches(ro, a, n_proc):  # one list per epoch
        for mb in minibatches:
            n_tok = common.sum_over_ranks(ro.mask[mb].sum(), n_proc).item()  # the whole mini-batch's tokens
            for part, mi, last in lockstep(ro, mb, a.token_budget, n_proc, common.sharded(fwd_pi), device):
                mask, adv = part.mask.to(device) * bool(mi), part.adv.to(device)
                # policy and critic share no parameter: a backward each equals one of the summed losses, and only
                # one model's activations are alive at a time. DDP / FSDP average the ranks' gradients: * n_proc
                with common.no_sync_unless(last, fwd_pi), amp():
                    logp, entropy = fwd_pi(part)
                    log_ratio = (logp - part.old_logp.to(device)) * mask  # 0 on padding: a ratio of 1
                    ratio = log_ratio.exp()
                    pg = policy_loss(ratio, adv, a.clip_ratio)
                    ((pg * mask).sum() * n_proc / n_tok).backward()
                if fwd_v is not None:
                    with common.no_sync_unless(last, fwd_v), amp():
                        old_v, v = part.values.to(device), fwd_v(part)
                        vf = value_loss(v, old_v, part.returns.to(device), a.value_clip)
                        ((vf * mask).sum() * n_proc / n_tok).backward()
                    log_mean("value_loss", vf.detach(), mask)
                    log_mean("value_clipfrac", ((v - old_v).abs() > a.value_clip).float(), mask)
                with torch.no_grad():
                    log_mean("policy_loss", pg, mask)
                    log_mean("entropy", entropy, mask)
                    log_mean("approx_kl", (ratio - 1) - log_ratio, mask)  # Schulman k3
                    log_mean("clipfrac", ((ratio - 1).abs() > a.clip_ratio).float(), mask)
                    log_mean("ratio", ratio, mask)
            for fwd, opt in ((fwd_pi, opt_pi), (fwd_v, opt_v)):
                if fwd is not None:
                    common.clip_and_step([p for p in fwd.parameters() if p.requires_grad], opt, a.clip)
    names = sorted(stats)
    totals = common.sum_over_ranks(torch.tensor([stats[k] for k in names], dtype=torch.float64), n_proc)
    return {k: total / max(n, 1.0) for k, (total, n) in zip(names, totals.tolist())}


def shuffled_minibatches(ro, a, n_proc):
    """For each of --ppo-epochs, --mini-batches (sizes within one) cut from a shuffle of the step's global batch, as
    this rank's rows of each (possibly none): the rows one process would put in them. Every rank's Python RNG is
    seeded and drawn alike, so all shuffle alike."""
    rows = ro.index.tolist() if n_proc > 1 else list(range(len(ro)))  # one process: the rows as they are
    local = {g: i for i, g in enumerate(rows)}
    order = list(range(int(common.sum_over_ranks(torch.tensor(len(ro)), n_proc))))
    n_mb = min(a.mini_batches, len(order))
    cuts = [round(i * len(order) / n_mb) for i in range(n_mb + 1)]
    epochs = []
    for _ in range(a.ppo_epochs):
        random.shuffle(order)
        epochs.append([[local[g] for g in order[m0:m1] if g in local] for m0, m1 in zip(cuts, cuts[1:])])
    return epochs


# ----------------------------------------------------------------------------------------------------------------
# The loop (train.py --stage ppo calls it)


def train(a, rank, n_proc, device):
    """--steps iterations of: rollout -> rewards with the KL penalty -> GAE (Eq. 2) -> K epochs of the clipped
    policy (Eq. 3) and value (Eq. 4) losses. Returns the summary (None when --stop-after stopped the run)."""
    out = common.prepare_out(a.out, a.resume, rank)
    fsdp = a.fsdp and n_proc > 1
    amp = common.autocast(device, a.autocast, cache=False)  # the rollout runs four models without a backward
    if not a.rm:
        raise SystemExit("error: --stage ppo needs --rm DIR (train one with: torchrun train.py --stage rm --out DIR)")
    policy = trained(InternLMXComposer2.from_pretrained(a.init or WORLD_SFT, device=device), a)
    prompts, held = ppo_prompts(a)
    summary = start_summary(a, out, rank, n_proc, fsdp, policy, held)  # before wrapping: rank 0 holds it whole
    roles = load_roles(a, policy, n_proc, device, torch.bfloat16 if common.autocast_on(device, a.autocast)
                       else torch.float32)
    fwd_pi, fwd_v = roles.policy, roles.critic
    critic = common.unwrap(fwd_v).model if fwd_v is not None else None
    critic_lr = a.critic_lr or 5 * a.lr
    # after wrapping: FSDP replaces the parameters by their shards
    opt_pi = common.make_optimizer(policy, a.lr, a.weight_decay, a.beta2)
    opt_v = common.make_optimizer(critic, critic_lr, a.weight_decay, a.beta2) if critic is not None else None
    step = resume(a, out, rank, policy, opt_pi, critic, opt_v) if a.resume else 0
    per_prompt = a.rloo_k if a.algo == "rloo" else 1
    t0, tokens_done, first_step, stats = time.time(), 0, step, None
    while step < a.steps:
        checked = check_heldout(policy, held, a, step, rank, fsdp)  # the gold score, before this iteration
        mine, index = step_prompts(prompts, a, step, rank, n_proc)
        # one generator per response, seeded by its place in the global batch: resume and process count change
        # nothing
        generators = [torch.Generator(device).manual_seed(sample_seed(a.seed, step, g * per_prompt + j))
                      for g in index for j in range(per_prompt)]
        t_roll = time.time()
        # 1. rollout: responses, their scores, and log-probs / values of every response token
        with amp():
            ro = collect_rollouts(roles, mine, a, device, generators, index)
        # 2-3. rewards with the KL penalty, and advantages (GAE, Eq. 2; or RLOO's leave-one-out baseline)
        stats = compute_advantages(ro, a, n_proc)
        t_roll = time.time() - t_roll
        # 4. K epochs of the clipped policy (Eq. 3) and value (Eq. 4) losses over shuffled mini-batches
        lr = common.lr_at(step, a.lr, a.steps, a.warmup)
        common.set_lr(opt_pi, lr)
        if opt_v is not None:
            common.set_lr(opt_v, lr * critic_lr / a.lr)
        for m in (policy, critic):  # train mode: --grad-ckpt checkpoints only in training forwards
            if m is not None:
                m.train()
        stats.update(ppo_update(fwd_pi, fwd_v, ro, opt_pi, opt_v, a, device, n_proc, amp))
        step += 1
        tokens_done += int(ro.mask.sum())
        stats.update(step=step, response_length=ro.mask.sum().item() / len(ro),
                     eos_rate=ro.stopped.float().mean().item(), tokens_per_s=tokens_done * n_proc / (time.time() - t0),
                     rollout_s=t_roll, explained_variance=explained_variance(ro, n_proc) if critic else float("nan"))
        if held:
            answers = [policy.decode_answer(ro.response[b, :n].tolist()) for b, n in enumerate(ro.lengths().tolist())]
            stats["train_accuracy"] = sum(map(checker.is_correct, ro.items, answers)) / len(ro)
        log_iteration(out, stats, checked, a, rank, n_proc)
        stop = a.stop_after and step - first_step >= a.stop_after and step < a.steps
        if step % a.save_every == 0 or step == a.steps or stop:
            save(out, [("", policy, opt_pi), ("critic", critic, opt_v)], step, rank, n_proc, fsdp)
        if stop:
            common.log(rank, f"stopped after {a.stop_after} iterations at {step}; continue with --resume")
            return None
    # FSDP: every rank gathers a whole copy for the held-out evaluation (rank 0 runs it)
    return finish(a, out, rank, common.unsharded_copy(policy) if fsdp and held else policy, held, summary, stats, t0)


def start_summary(a, out, rank, n_proc, fsdp, policy, held):
    """The run's summary, with the checker's verdict on the starting policy (written now: kept across a resume)."""
    summary = {"stage": "ppo", "algo": a.algo, "processes": n_proc, "fsdp": fsdp, "seed": a.seed, "kl_coef": a.kl_coef}
    if held and rank == 0 and not a.resume:
        summary.update(checker.tagged(checker.eval_policy(policy, held, a.hd_num), "before"))
        common.log(rank, f"held-out greedy accuracy before: {summary['accuracy_before']:.3f}")
        data.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def resume(a, out, rank, policy, opt_pi, critic, opt_v):
    step = common.load_checkpoint(out, policy, opt_pi)
    if critic is not None:
        common.load_checkpoint(out / "critic", critic, opt_v)
    if rank == 0:
        common.trim_metrics(out / "metrics.jsonl", step)
    common.log(rank, f"resumed {out} at step {step}")
    return step


def check_heldout(policy, held, a, step, rank, fsdp):
    """Every --eval-every iterations, the checker's verdict on this policy's greedy held-out answers: the gold score
    of Gao et al.'s over-optimisation curve. FSDP: every rank gathers a whole copy, rank 0 evaluates."""
    if not (held and a.eval_every and step % a.eval_every == 0):
        return None
    judged = common.unsharded_copy(policy) if fsdp else policy
    return checker.eval_policy(judged, held, a.hd_num) if rank == 0 else None


def log_iteration(out, stats, checked, a, rank, n_proc):
    """One line printed and one in metrics.jsonl for the iteration (every rank's numbers averaged: equal shares), and
    the held-out check made at its start, beside this iteration's KL and score (the same policy sampled them)."""
    if n_proc > 1:
        keys = sorted(k for k, v in stats.items() if isinstance(v, float) and k != "tokens_per_s")
        mean = common.sum_over_ranks(torch.tensor([stats[k] for k in keys], dtype=torch.float64), n_proc) / n_proc
        stats.update(zip(keys, mean.tolist()))
    if rank != 0:
        return
    print(f"iter {stats['step']}/{a.steps} score {stats['score']:+.3f} kl {stats['kl']:.3f} len "
          f"{stats['response_length']:.1f} eos {stats['eos_rate']:.2f} pg {stats['policy_loss']:+.4f} "
          + (f"vf {stats['value_loss']:.4f} ev {stats['explained_variance']:+.2f} " if "value_loss" in stats else "")
          + f"clip {stats['clipfrac']:.3f} akl {stats['approx_kl']:.4f} ent {stats['entropy']:.3f}"
          + (f" acc {stats['train_accuracy']:.3f}" if "train_accuracy" in stats else ""), flush=True)
    common.append_jsonl(out / "metrics.jsonl", stats)
    if checked is not None:
        common.append_jsonl(out / "metrics.jsonl", {"step": stats["step"] - 1, "phase": "start", "kl": stats["kl"],
                                                    "score": stats["score"],
                                                    **{"heldout_" + k: v for k, v in checked.items()}})


def trained(model, a):
    """A policy or critic as PPO trains it: vision path and separators frozen (image embeddings are rollout
    constants), the decoder checkpointed under --grad-ckpt."""
    model.model.gradient_checkpointing = a.grad_ckpt
    for p in [*model.vit.parameters(), *model.vision_proj.parameters(), model.plora_glb_GN, model.plora_sub_GN]:
        p.requires_grad_(False)
    return model


def load_roles(a, policy, n_proc, device, frozen_dtype=torch.float32):
    """The objectives of the four roles around `policy` (loaded from --init): the frozen reference from --init, the
    frozen reward model(s) and, for PPO, the critic from --rm, the frozen ones in `frozen_dtype` (bf16 under
    autocast, whose matmuls round their weights to bf16 anyway). DDP for the trained ones under torchrun; with
    --fsdp every model's decoder sharded, the frozen ones' too, each right after it is loaded: at 7B no GPU holds
    two of them whole."""
    load = lambda cls, path, **kw: cls.from_pretrained(path, device=device, **kw)  # noqa: E731
    frozen = lambda cls, path: load(cls, path, dtype=frozen_dtype).requires_grad_(False)  # noqa: E731
    pi = common.wrap(PolicyLogprobs(policy, a.temperature, device), n_proc, a.fsdp)
    ref = common.shard_frozen(PolicyLogprobs(frozen(InternLMXComposer2, a.init or WORLD_SFT), a.temperature,
                                             device), n_proc, a.fsdp)
    rms = [common.shard_frozen(RewardScore(frozen(RewardModel, d), f"rm{i}", a.normalize_reward, device), n_proc,
                               a.fsdp) for i, d in enumerate(a.rm)]
    critic = None
    if a.algo == "ppo":
        model = trained(load(RewardModel, a.rm[0]), a)
        critic = common.wrap(CriticValues(model, reward_norm(model, a.normalize_reward), device), n_proc, a.fsdp)
    return Roles(pi, ref, critic, rms)


def step_prompts(prompts, a, step, rank, n_proc):
    """This rank's prompts of iteration `step` and their places in the step's global batch: a draw of --batch
    prompts (RLOO: a k-th of them, k samples each: the same number of responses), dealt to the ranks in turn."""
    per_rank = a.batch // n_proc
    if a.algo == "rloo":
        per_rank = max(1, per_rank // a.rloo_k)
    drawn = random.Random(a.seed + step).sample(prompts, a.batch)[:per_rank * n_proc]
    index = list(range(rank, len(drawn), n_proc))
    return [drawn[g] for g in index], index


def ppo_prompts(a):
    """(chat prompt with its history, images, row) for every fine-tuning row, and the world's held-out prompts."""
    if a.data:
        rows, held = data.read_sft(a.data), []
    else:
        files = store.ensure_world(a.world_dir)
        rows, held = data.read_sft(files["sft_train"]), store.heldout_items(files["heldout_prompts"])
    return [(data.sft_prompt(r), r["images"], r) for r in rows], held


def save(out, models, step, rank, n_proc, fsdp):
    """Each (sub-directory, model, optimizer) to out/sub. DDP: the ranks must hold the same weights (a gradient that
    missed the all-reduce shows here), rank 0 writes; FSDP: every rank gathers its shards, rank 0 writes."""
    for sub, model, opt in models:
        if model is None:
            continue
        if not fsdp:
            common.check_replicas(model, n_proc, sub or "policy")
        if rank == 0 or fsdp:
            common.save_checkpoint(out / sub, model, opt, step, write=rank == 0)


def finish(a, out, rank, policy, held, summary, stats, t0):
    """summary.json (held-out accuracy before and after, the last KL), curves.svg and overoptimisation.svg."""
    summary["seconds"], summary["matmul_gflops"] = round(time.time() - t0, 1), common.matmul_gflops()
    if stats is None:  # resumed a finished run: its last logged iteration
        stats = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    summary["kl"] = stats["kl"]
    if held and rank == 0:
        summary.update(checker.tagged(checker.eval_policy(policy, held, a.hd_num), "after"))
        if "accuracy_before" not in summary:  # measured before a resume, in the summary written then
            before = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
            summary.update({k: v for k, v in before.items() if "_before" in k})
    if rank == 0:
        figures.write_curves(out, ["score", "kl", "train_accuracy", "value_loss", "entropy", "response_length"],
                            f"PPO ({a.algo}): {out.name}", xlabel="PPO iteration")
        data.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        if held and a.eval_every:  # the held-out checks, from step 0 on
            data.atomic_write_text(out / "overoptimisation.svg", figures.overoptimisation_svg([out]))
        print(json.dumps(summary, indent=2))
    return summary
