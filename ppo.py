"""PPO (and critic-free RLOO) for a multimodal chat policy, rewarded by IXC-2.5-Reward.

    torchrun train.py --stage ppo --rm runs/rm --out runs/ppo          # built-in world, from its SFT policy

Four roles (paper §3.3, "N+ implementation details"): the policy (trained), a frozen reference copy of it, the
reward model (frozen), and the critic, initialised from the reward model and read at every response token.
One iteration: sample responses -> score them -> per-token rewards with a KL penalty -> GAE (Eq. 2) ->
K epochs of clipped policy (Eq. 3) and value (Eq. 4) updates over shuffled mini-batches.

Padding contract, in one place (`rollout_batch`): prompts left-padded, responses right-padded after them, position
ids count real tokens only, masks come from lengths (so a pad id equal to a stop token changes nothing), rewards sit
on the last real response token.
"""
import argparse
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from model import InternLMXComposer2
from reward import RewardModel


def add_args(p):
    """PPO hyper-parameters; defaults follow TRL / the N+ details (gamma 1, lambda 0.95, clip 0.2, k1 KL)."""
    g = p.add_argument_group("ppo")
    g.add_argument("--algo", choices=["ppo", "rloo"], default="ppo", help="rloo: critic-free, leave-one-out baseline")
    g.add_argument("--kl-coef", type=float, default=0.05, help="beta of the per-token KL penalty in the reward")
    g.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1")
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lam", type=float, default=0.95)
    g.add_argument("--clip-ratio", type=float, default=0.2)
    g.add_argument("--value-clip", type=float, default=0.2)
    g.add_argument("--critic-lr", type=float, help="default: 5 x the policy lr")
    g.add_argument("--ppo-epochs", type=int, default=2)
    g.add_argument("--mini-batches", type=int, default=2)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--missing-eos-penalty", type=float, default=1.0, help="subtracted when no stop token came")
    g.add_argument("--normalize-reward", action=argparse.BooleanOptionalAction, default=True,
                   help="(score - mean) / std with the held-out statistics the RM stage stored in its config")
    g.add_argument("--rloo-k", type=int, default=4, help="rloo: samples per prompt")
    g.add_argument("--rollout-chunk", type=int, default=32, help="prompts per generation call")


# ----------------------------------------------------------------------------------------------------------------
# Batches: [left-padded prompt | right-padded response]


def rollout_batch(model, samples, images_key, device):
    """The padded batch of prompt + response for `model`, with its own cached image embeddings."""
    rows = [model.splice(s["segments"], [im.to(device, non_blocking=True) for im in s[images_key]]) for s in samples]
    prompt = model.pad_batch(rows, left_pad=True)
    P, T = prompt["embeds"].shape[1], max(len(s["response"]) for s in samples)
    resp = torch.full((len(samples), T), model.cfg.pad_token_id, dtype=torch.long, device=device)
    resp_mask = torch.zeros(len(samples), T, dtype=torch.long, device=device)
    for b, s in enumerate(samples):
        resp[b, :len(s["response"])] = torch.tensor(s["response"], device=device)
        resp_mask[b, :len(s["response"])] = 1
    attention_mask = torch.cat([prompt["attention_mask"], resp_mask], 1)
    return {"embeds": torch.cat([prompt["embeds"], model.model.tok_embeddings(resp)], 1),
            "im_mask": torch.cat([prompt["im_mask"], torch.zeros_like(resp_mask, dtype=torch.bool)], 1),
            "attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
            "response": resp, "mask": resp_mask.float(), "P": P}


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


def critic_norm(critic, a):
    return (critic.cfg.reward_mean, critic.cfg.reward_std) if a.normalize_reward else (0.0, 1.0)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def sum_over_ranks(t, world):
    """Sum of a small tensor over the ranks, moved to the device the backend needs (NCCL: the GPU)."""
    if world == 1:
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(dev)
    dist.all_reduce(out)
    return out.to(t.device)


def whiten(x, mask, shift_mean=True, world=1):
    """Normalise over valid tokens only (padding must not move the statistics), pooled over every rank's rollouts
    (one batch, as in a 1-process run)."""
    total = sum_over_ranks(torch.stack([(x * mask).sum(), mask.sum()]), world)
    mean = total[0] / total[1].clamp(min=1)
    var = sum_over_ranks(((x - mean) ** 2 * mask).sum(), world) / total[1].clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (paper Eq. 2), backwards over each row's valid tokens; V after the last
    token is 0 (the episode ends there)."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def kl_penalty(logp, ref_logp, estimator):
    """Per-token KL(pi || pi_ref) estimate: k1 = log ratio, k3 = (r - 1) - log r with r = pi_ref / pi (Schulman)."""
    if estimator == "k1":
        return logp - ref_logp
    log_r = ref_logp - logp
    return log_r.exp() - 1 - log_r


# ----------------------------------------------------------------------------------------------------------------
# Rollout


def reward_scores(rms, samples, device, normalize):
    """Each reward model scores prompt + response under the reward template (its suffix `</s>[UNUSED_TOKEN_130]`
    appended after the response and its end-of-turn); several models are averaged."""
    total = torch.zeros(len(samples), device=device)
    for i, rm in enumerate(rms):
        suffix = rm.tokenizer.encode("\n</s>" + data.REWARD_TOKEN, add_special_tokens=False)
        rows = []
        for s in samples:
            # the template's answer ends with end-of-turn: a response that stopped on </s> gets it in its place
            resp = s["response"][:-1] if s["stopped"] and s["response"][-1] == rm.tokenizer.eos_id else s["response"]
            resp = resp if resp[-1:] == [rm.tokenizer.eot_id] else resp + [rm.tokenizer.eot_id]
            rows.append(rm.splice(s["segments"] + [resp + suffix], [im.to(device) for im in s[f"rm_images{i}"]]))
        score = rm.score_embedded(rows)
        total += (score - rm.cfg.reward_mean) / rm.cfg.reward_std if normalize else score
    return total / len(rms)


@torch.no_grad()
def collect_rollouts(policy, ref, critic, rms, prompts, a, device, generator):
    """Sample responses in chunks (memory follows --rollout-chunk), then everything PPO needs per token."""
    policy.eval()
    n = a.rloo_k if a.algo == "rloo" else 1
    samples = []
    for c in range(0, len(prompts), a.rollout_chunk):
        chunk = prompts[c:c + a.rollout_chunk]
        seqs = [policy.sequence(prompt, ims, a.hd_num) for prompt, ims, _ in chunk]
        batch = policy.embed_batch(seqs, left_pad=True)
        out = policy.generate(batch["embeds"], batch["im_mask"], batch["attention_mask"], a.max_new_tokens,
                              a.temperature, a.top_p, generator=generator, n=n)
        stop = {policy.tokenizer.eos_id, policy.tokenizer.eot_id}
        for j, row in enumerate(out.tolist()):
            segments, pixels = seqs[j // n]
            end = next((t + 1 for t, tok in enumerate(row) if tok in stop), None)
            samples.append({"segments": segments, "pixels": pixels, "item": chunk[j // n][2], "group": c + j // n,
                            "response": row[:end] if end else row, "stopped": end is not None})
    # image embeddings are constants during PPO (vision frozen): encode once per model, keep them on the host
    for key, model in [("images", policy)] + ([("critic_images", critic)] if critic is not None else []) + \
            [(f"rm_images{i}", rm) for i, rm in enumerate(rms)]:
        for s in samples:
            s[key] = [e.cpu().pin_memory() if device.type == "cuda" else e.cpu()
                      for e in model.encode_images(s["pixels"])] if s["pixels"] else []
    scores = reward_scores(rms, samples, device, a.normalize_reward)
    for s, sc in zip(samples, scores.tolist()):
        s["score"] = sc - (0.0 if s["stopped"] else a.missing_eos_penalty)
    for s0 in range(0, len(samples), a.rollout_chunk):
        chunk = samples[s0:s0 + a.rollout_chunk]
        batch = rollout_batch(policy, chunk, "images", device)
        logp, _ = logprobs_of(policy, batch, a.temperature)
        ref_logp, _ = logprobs_of(ref, rollout_batch(ref, chunk, "images", device), a.temperature)
        values = values_of(critic, rollout_batch(critic, chunk, "critic_images", device), critic_norm(critic, a)) \
            if critic is not None else torch.zeros_like(logp)
        for b, s in enumerate(chunk):
            T = len(s["response"])
            s["old_logp"], s["ref_logp"], s["values"] = logp[b, :T].cpu(), ref_logp[b, :T].cpu(), values[b, :T].cpu()
    return samples


def compute_advantages(samples, a, world=1):
    """PPO: per-token -beta*KL, score on the last real token, GAE, whitened advantages. RLOO: sequence reward
    minus the mean of the other samples of the same prompt, on every token."""
    T = max(len(s["response"]) for s in samples)
    pad = lambda key: torch.stack([F.pad(s[key], (0, T - len(s[key]))) for s in samples])  # noqa: E731
    mask = torch.stack([F.pad(torch.ones(len(s["response"])), (0, T - len(s["response"]))) for s in samples])
    logp, ref_logp, values = pad("old_logp"), pad("ref_logp"), pad("values")
    kl = kl_penalty(logp, ref_logp, a.kl_estimator) * mask
    score = torch.tensor([s["score"] for s in samples])
    last = mask.sum(1).long() - 1
    if a.algo == "ppo":
        rewards = -a.kl_coef * kl
        rewards[torch.arange(len(samples)), last] += score
        adv, returns = gae(rewards, values, mask, a.gamma, a.lam)
    else:
        seq_reward = score - a.kl_coef * kl.sum(1)
        groups = torch.tensor([s["group"] for s in samples])
        same = (groups[:, None] == groups[None, :]).float()
        baseline = (same @ seq_reward - seq_reward) / (same.sum(1) - 1).clamp(min=1)
        adv = (seq_reward - baseline)[:, None] * mask
        returns = adv
    adv = whiten(adv, mask, world=world)
    for b, s in enumerate(samples):
        n = len(s["response"])
        s["adv"], s["returns"] = adv[b, :n], returns[b, :n]
    return {"kl": (kl.sum(1)).mean().item(), "score": score.mean().item(), "score_std": score.std().item()}


# ----------------------------------------------------------------------------------------------------------------
# Update


def pad_rows(samples, key, T):
    return torch.stack([F.pad(s[key], (0, T - len(s[key]))) for s in samples])


def ppo_update(policy, critic, fwd_pi, fwd_v, samples, opt_pi, opt_v, a, device, world):
    """--ppo-epochs passes over shuffled mini-batches; each mini-batch is one optimizer step, accumulated over
    micro-batches that fit --token-budget. Losses are token means over the whole mini-batch, all ranks included.
    fwd_pi / fwd_v are train.Whole(model), DDP-wrapped under torchrun: every forward that carries gradient runs
    inside them, or DDP never arms its all-reduce and each rank would train its own copy."""
    stats = {}   # name -> [sum over valid tokens, count]: token means over the whole update

    def log_mean(name, x, mask):
        total = stats.setdefault(name, [0.0, 0.0])
        total[0] += (x * mask).sum().item()
        total[1] += mask.sum().item()

    idx = list(range(len(samples)))
    n_mb = min(a.mini_batches, len(idx))
    cuts = [round(i * len(idx) / n_mb) for i in range(n_mb + 1)]  # exactly --mini-batches, sizes within one
    for epoch in range(a.ppo_epochs):
        random.shuffle(idx)
        for m0, m1 in zip(cuts, cuts[1:]):
            mb = [samples[i] for i in idx[m0:m1]]
            n_tok = sum_over_ranks(torch.tensor(float(sum(len(s["response"]) for s in mb))), world)
            lengths = [len(s["response"]) + s["segments_len"] for s in mb]
            micro = data.token_budget_batches(lengths, a.token_budget, shuffle=False)
            for k, mi in enumerate(micro):
                # DDP decides in the forward whether the backward all-reduces: a rank's micro-batches but the last
                # run forward and backward under no_sync, so that each rank reduces once per mini-batch however
                # many micro-batches its share packs into
                sync = world == 1 or k == len(micro) - 1
                with (fwd_pi.no_sync() if not sync else nullcontext()), \
                        (fwd_v.no_sync() if not sync and fwd_v is not None else nullcontext()):
                    ms = [mb[i] for i in mi]
                    T = max(len(s["response"]) for s in ms)
                    mask, adv = pad_rows(ms, "mask", T).to(device), pad_rows(ms, "adv", T).to(device)
                    old_logp = pad_rows(ms, "old_logp", T).to(device)
                    logp, entropy = fwd_pi(
                        lambda m: logprobs_of(m, rollout_batch(m, ms, "images", device), a.temperature))
                    log_ratio = (logp - old_logp) * mask
                    ratio = log_ratio.exp()
                    # paper Eq. 3: the clipped surrogate, a token mean over the mini-batch
                    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - a.clip_ratio, 1 + a.clip_ratio))
                    loss = (pg * mask).sum() * world / n_tok.item()
                    if critic is not None:
                        old_v, ret = pad_rows(ms, "values", T).to(device), pad_rows(ms, "returns", T).to(device)
                        v = fwd_v(lambda m: values_of(m, rollout_batch(m, ms, "critic_images", device),
                                                      critic_norm(m, a)))
                        # paper Eq. 4: the value loss, clipped around the rollout's values
                        v_clip = old_v + (v - old_v).clamp(-a.value_clip, a.value_clip)
                        vf = 0.5 * torch.max((v - ret) ** 2, (v_clip - ret) ** 2)
                        loss = loss + (vf * mask).sum() * world / n_tok.item()
                        log_mean("value_loss", vf.detach(), mask)
                        log_mean("value_clipfrac", ((v - old_v).abs() > a.value_clip).float(), mask)
                    loss.backward()
                with torch.no_grad():
                    log_mean("policy_loss", pg, mask)
                    log_mean("entropy", entropy, mask)
                    log_mean("approx_kl", (ratio - 1) - log_ratio, mask)  # Schulman k3
                    log_mean("clipfrac", ((ratio - 1).abs() > a.clip_ratio).float(), mask)
                    log_mean("ratio", ratio, mask)
            for model, opt in ((policy, opt_pi), (critic, opt_v)):
                if model is not None:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], a.clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
    return {k: total / max(n, 1.0) for k, (total, n) in stats.items()}


def explained_variance(samples):
    v = torch.cat([s["values"] for s in samples])
    r = torch.cat([s["returns"] for s in samples])
    return (1 - (r - v).var() / r.var().clamp(min=1e-8)).item()


# ----------------------------------------------------------------------------------------------------------------
# The loop (called by train.py --stage ppo)


def train(a, rank, world, device):
    from train import WORLD_SFT, Whole, append_jsonl, check_replicas, ensure_world, eval_policy, heldout_items, \
        load_checkpoint, log, lr_at, make_optimizer, save_checkpoint, sft_prompt, trim_metrics
    from model import atomic_write_text
    if not a.rm:
        raise SystemExit("error: --stage ppo needs --rm DIR (train one with: torchrun train.py --stage rm --out DIR)")
    if a.batch % world:  # equal shares: every rank runs as many mini-batches, so the all-reduces pair up
        raise SystemExit(f"error: --batch {a.batch} must be a multiple of the {world} processes")
    out = Path(a.out)
    if (out / "resume.safetensors").exists() and not a.resume:
        raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    init = a.init or WORLD_SFT
    policy = InternLMXComposer2.from_pretrained(init, device=device)
    ref = InternLMXComposer2.from_pretrained(init, device=device).requires_grad_(False)
    rms = [RewardModel.from_pretrained(d, device=device).requires_grad_(False) for d in a.rm]
    critic = RewardModel.from_pretrained(a.rm[0], device=device) if a.algo == "ppo" else None
    for m in (policy, critic):
        if m is not None:  # vision path and separators frozen: image embeddings are constants of the rollout
            for p in [*m.vit.parameters(), *m.vision_proj.parameters(), m.plora_glb_GN, m.plora_sub_GN]:
                p.requires_grad_(False)
    opt_pi = make_optimizer(policy, a)
    a_critic = type(a)(**{**vars(a), "lr": a.critic_lr or 5 * a.lr})
    opt_v = make_optimizer(critic, a_critic) if critic is not None else None
    ddp = torch.nn.parallel.DistributedDataParallel
    wrap = (lambda m: ddp(Whole(m), find_unused_parameters=True)) if world > 1 else Whole
    fwd_pi, fwd_v = wrap(policy), (wrap(critic) if critic is not None else None)
    step = 0
    if a.resume:
        step, _ = load_checkpoint(out, policy, opt_pi)
        trim_metrics(out / "metrics.jsonl", step)
        if critic is not None:
            load_checkpoint(out / "critic", critic, opt_v)
        log(rank, f"resumed {out} at step {step}")
    if a.data:
        rows = data.read_sft(a.data)
        held = []
    else:
        world_files = ensure_world(a.world_dir)
        rows = data.read_sft(world_files["sft_train"])
        held = heldout_items(world_files["heldout_prompts"])
    prompts = [(sft_prompt(r), r["images"], r) for r in rows]  # chat prompt (history included), images, row
    summary = {"stage": "ppo", "algo": a.algo, "processes": world, "seed": a.seed}
    if held and rank == 0 and step == 0:
        summary["accuracy_before"], summary["accuracy_before_by_kind"] = eval_policy(policy, held, a.hd_num)
        log(rank, f"held-out greedy accuracy before: {summary['accuracy_before']:.3f}")
    generator = torch.Generator(device=device)
    t0, tokens_done, first_step, stats = time.time(), 0, step, None
    while step < a.steps:
        rng = random.Random(a.seed + step)
        generator.manual_seed((a.seed * 100_003 + step) * 1024 + rank)  # a function of the step: resume is exact
        chunk = rng.sample(prompts, a.batch)[rank::world]
        if a.algo == "rloo":
            chunk = chunk[:max(1, len(chunk) // a.rloo_k)]  # k samples each: the same number of responses
        t_roll = time.time()
        samples = collect_rollouts(policy, ref, critic, rms, chunk, a, device, generator)
        for s in samples:
            s["mask"] = torch.ones(len(s["response"]))
            s["segments_len"] = sum(len(x) if not isinstance(x, int) else 0 for x in s["segments"]) + \
                sum(e.shape[0] for e in s["images"])
        stats = compute_advantages(samples, a, world)
        t_roll = time.time() - t_roll
        for opt in (opt_pi, opt_v):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, a) * (1 if opt is opt_pi else (a.critic_lr or 5 * a.lr) / a.lr)
        policy.train()
        stats.update(ppo_update(policy, critic, fwd_pi, fwd_v, samples, opt_pi, opt_v, a, device, world))
        step += 1
        n_tok = sum(len(s["response"]) for s in samples)
        tokens_done += n_tok
        stats.update(step=step, response_length=n_tok / len(samples),
                     eos_rate=sum(s["stopped"] for s in samples) / len(samples),
                     tokens_per_s=tokens_done * world / (time.time() - t0),
                     rollout_s=t_roll, explained_variance=explained_variance(samples) if critic else float("nan"))
        if held:
            stats["train_accuracy"] = sum(data.is_correct(s["item"], policy.decode_answer(s["response"]))
                                          for s in samples) / len(samples)
        if world > 1:  # the dashboard shows the whole batch: every rank's numbers averaged (equal shares)
            keys = sorted(k for k, v in stats.items() if isinstance(v, float) and k != "tokens_per_s")
            mean = sum_over_ranks(torch.tensor([stats[k] for k in keys], dtype=torch.float64), world) / world
            stats.update(zip(keys, mean.tolist()))
        if rank == 0:
            print(f"iter {step}/{a.steps} score {stats['score']:+.3f} kl {stats['kl']:.3f} len "
                  f"{stats['response_length']:.1f} eos {stats['eos_rate']:.2f} pg {stats['policy_loss']:+.4f} "
                  + (f"vf {stats['value_loss']:.4f} ev {stats['explained_variance']:+.2f} " if critic else "")
                  + f"clip {stats['clipfrac']:.3f} akl {stats['approx_kl']:.4f} ent {stats['entropy']:.3f}"
                  + (f" acc {stats['train_accuracy']:.3f}" if held else ""), flush=True)
            append_jsonl(out / "metrics.jsonl", stats)
        stop = a.stop_after and step - first_step >= a.stop_after and step < a.steps
        save = step % a.save_every == 0 or step == a.steps or stop
        if save:
            check_replicas(policy, world, "policy")
            if critic is not None:
                check_replicas(critic, world, "critic")
        if save and rank == 0:
            save_checkpoint(out, policy, opt_pi, step)
            if critic is not None:
                (out / "critic").mkdir(exist_ok=True)
                save_checkpoint(out / "critic", critic, opt_v, step)
        if stop:
            log(rank, f"stopped after {a.stop_after} iterations at {step}; continue with --resume")
            return None
    summary["seconds"] = round(time.time() - t0, 1)
    if stats is None:  # resumed a finished run: its last logged iteration
        stats = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    summary["kl"] = stats["kl"]
    if held and rank == 0:
        summary["accuracy_after"], summary["accuracy_after_by_kind"] = eval_policy(policy, held, a.hd_num)
        before = json.loads((out / "summary.json").read_text()) if "accuracy_before" not in summary and \
            (out / "summary.json").exists() else summary
        summary.setdefault("accuracy_before", before.get("accuracy_before"))
    if rank == 0:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    return summary
