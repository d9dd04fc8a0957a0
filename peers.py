"""Ahead of the peers, measured side by side (issue 35): our loops against the trainers a user would otherwise run,
the same weights in both, the same work, one process, interleaved (ours, theirs, ours, ...), so that background
load hits both alike. `python bench.py --peers [--json FILE]` runs it; `--quick` shrinks everything to a smoke run.

    rm_train_vs_trl  train.py --stage rm's step (RewardModel.pair_rewards, bt_loss, make_optimizer, clip_and_step)
                     vs TRL RewardTrainer on the twin LlamaForSequenceClassification; pairs/s
    rloo_vs_trl      ppo.collect_rollouts + compute_advantages + ppo_update (--algo rloo, k = 4) vs TRL RLOOTrainer
    ppo_vs_trl       the same with --algo ppo (critic) vs trl.experimental.ppo.PPOTrainer; prompts/s
    generate_vs_hf   InternLMXComposer2.generate vs LlamaForCausalLM.generate (KV cache); new tokens/s
    bon4_vs_hf       best-of-4 as bon.py runs it (one prefill, KV cache copied to 4 rows, the 4 scored in one batch)
                     vs generate(num_return_sequences=4) and the twin reward model; prompts/s

The ratio is ours over theirs in throughput: above 1 we are faster. Text only, so both sides run one architecture:
InternLM2's decoder is Llama's with a packed `wqkv` (tests/test_reference.py maps one onto the other). Weights are
random (init_weights); prompts are random token ids (the RL rows: random text in the world's tokenizer, shipped in
checkpoints/, which our PPO tokenizes), so nothing in ../shared is needed. The peers read ids through a word-level
tokenizer whose word i is id i, and whose end-of-sequence word has no id in the models' vocabulary: no response on
either side stops early, both sides decode exactly max_new_tokens. MFU: each side's executed model FLOPs (matmuls
and attention, 2 per multiply-add, a backward twice its forward) over the fp32 matmul speed common.matmul_gflops
measures just before the row (other jobs share these cores).
"""
import functools
import runpy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import batching
import bench
import common
import ppo
from model import Config, InternLMXComposer2, init_weights
from reward import RewardModel
from world import WORLD_CONFIG

# the launcher's own functions (Eq. 1, its parser), read from its file as torchrun runs it: nothing imports train.py
LAUNCHER = runpy.run_path(str(Path(__file__).resolve().parent / "train.py"), run_name="peers")

# The two sizes: the world's policy shape (its vocabulary of 640), and ~117M parameters with the real vocabulary,
# where the embedding and LM head (2 x 47M) outweigh the 8 decoder layers (23M)
SIZES = {"tiny": dict({k: v for k, v in WORLD_CONFIG.items() if k != "plora_rank"}, vocab_size=640),
         "100m": dict(vocab_size=92544, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      vision_config=bench.TINY_VISION)}
# The work at each size: prompts and their tokens, new tokens, RM pairs (prompt + chosen / rejected answers) and
# steps, RL settings (ppo.add_args names), and how many timed runs (plus one warm-up) of each
WORK = {"tiny": dict(prompts=4, prompt_len=64, new_tokens=32, pairs=8, pair_prompt=96, pair_answer=32, rm_steps=1,
                     rl_prompts=4, rl_new_tokens=24, epochs=2, mini_batches=2, rloo_k=4, runs=3),
        "100m": dict(prompts=4, prompt_len=64, new_tokens=32, bon_prompts=2, pairs=4, pair_prompt=128, pair_answer=32,
                     rm_steps=1, rl_prompts=2, rl_new_tokens=16, epochs=2, mini_batches=2, rloo_k=4, runs=3)}
QUICK = dict(prompts=2, prompt_len=8, new_tokens=4, pairs=2, pair_prompt=8, pair_answer=4, rm_steps=1,
             rl_prompts=2, rl_new_tokens=4, epochs=1, mini_batches=1, rloo_k=4, runs=1)
QUICK_SIZE = dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, vision_config=bench.TINY_VISION)
LR, TEMPERATURE = 1e-5, 1.0


# ----------------------------------------------------------------------------------------------------------------
# The twins: the same weights in transformers' Llama classes, and a tokenizer the peers can read ids through


def llama_twin(tf, ours, cls):
    """transformers `cls` (LlamaForCausalLM or LlamaForSequenceClassification) holding our model's weights: the
    decoder as bench.llama_twin maps it, plus the LM head (`output` -> `lm_head`) or the score head (same name)."""
    trunk = bench.llama_twin(tf, ours.model, ours.cfg)
    cfg = trunk.config
    cfg.num_labels, cfg.pad_token_id, cfg.tie_word_embeddings = 1, ours.cfg.pad_token_id, False
    cfg.bos_token_id, cfg.eos_token_id = ours.cfg.bos_token_id, None
    twin = cls(cfg)
    twin.model.load_state_dict(trunk.state_dict())
    head = twin.lm_head if hasattr(twin, "lm_head") else twin.score
    with torch.no_grad():
        head.weight.copy_(ours.output.weight if ours.cfg.head == "output" else ours.score.weight)
    if getattr(twin, "generation_config", None) is not None:
        twin.generation_config.eos_token_id, twin.generation_config.pad_token_id = None, ours.cfg.pad_token_id
    return twin.eval()


def id_tokenizer(tf, vocab_size, pad_id):
    """A transformers tokenizer whose word "t<i>" is token id i, split on spaces: the peers tokenize and detokenize
    our token ids through it unchanged. Its end-of-sequence word is id vocab_size, which the models cannot sample."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size + 1)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=f"t{pad_id}", eos_token=f"t{vocab_size}",
                                      bos_token="t1", unk_token="t0")


def ids_text(ids):
    return " ".join(f"t{i}" for i in ids)


def random_ids(g, n, vocab):
    """n token ids that are none of the special ids 0-2 (a pad id inside a sequence would end it for HF's pooling)."""
    return torch.randint(3, vocab, (n,), generator=g).tolist()


# ----------------------------------------------------------------------------------------------------------------
# FLOPs (2 per multiply-add): for MFU, each side counted from the work it executes


def trunk_params(cfg):
    """Matmul parameters of the decoder layers (no embeddings, no norms)."""
    kv = cfg.num_key_value_heads * cfg.head_dim
    D, I = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_hidden_layers * (D * (D + 2 * kv) + D * D + 3 * D * I)


def fwd_flops(cfg, rows, q_len, past=0, head_rows=0):
    """A forward of `rows` sequences of q_len new tokens after `past` cached ones: the layers' matmuls, causal
    attention (QK^T and AV: 4 * D per query-key pair per layer), and the LM head on `head_rows` positions."""
    keys = q_len * past + q_len * (q_len + 1) // 2
    return rows * (2 * trunk_params(cfg) * q_len + 4 * cfg.num_hidden_layers * cfg.hidden_size * keys) + \
        2 * cfg.vocab_size * cfg.hidden_size * head_rows


def generate_flops(cfg, rows, prompt, new, prefill_rows=None):
    """Prefill of prefill_rows prompts (default: all rows), then new - 1 one-token steps per row, head every step."""
    prefill_rows = rows if prefill_rows is None else prefill_rows
    return fwd_flops(cfg, prefill_rows, prompt, head_rows=prefill_rows) + \
        sum(fwd_flops(cfg, rows, 1, prompt + t, head_rows=rows) for t in range(new - 1))


# ----------------------------------------------------------------------------------------------------------------
# Timing: interleaved runs, median and spread


def timed(fns, runs):
    """{name: callable} -> {name: [seconds per run]}: one warm-up each, then `runs` interleaved rounds."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def side(work, seconds, flops, peak, unit):
    """One side's row: throughput (median over runs, and its range), MFU at the median."""
    per_s = [work / s for s in seconds]
    med = statistics.median(seconds)
    return {f"{unit}_per_s": work / med, "range": [min(per_s), max(per_s)], "seconds": seconds,
            "mfu": flops / med / peak}


def row(ours, theirs, **extra):
    """Ours over theirs in throughput, at the medians and per interleaved run (its range)."""
    unit = next(k for k in ours if k.endswith("_per_s"))
    ratios = [t / o for o, t in zip(ours["seconds"], theirs["seconds"])]
    return {"ratio": ours[unit] / theirs[unit], "ratio_range": [min(ratios), max(ratios)], "ours": ours,
            "theirs": theirs, **extra}


def build_models(cfg_kw, heads, seed=0):
    """Our models with random weights (init_weights, std 0.02): {head: model} for "output" (policy) / "score"."""
    out = {}
    for i, head in enumerate(heads):
        cls = InternLMXComposer2 if head == "output" else RewardModel
        out[head] = init_weights(cls(Config(**cfg_kw, plora_rank=0, head=head)), seed + i).eval()
    return out


# ----------------------------------------------------------------------------------------------------------------
# generate_vs_hf, bon4_vs_hf


def prompt_batch(model, prompts):
    """Our left-padded batch of token-id prompts (no images), as ppo.sample and bon.py build it."""
    return model.embed_batch([([p], []) for p in prompts], left_pad=True)


def generate_vs_hf(tf, cfg_kw, w, peak):
    m = build_models(cfg_kw, ["output"])["output"]
    hf = llama_twin(tf, m, tf.LlamaForCausalLM)
    cfg, g = m.cfg, torch.Generator().manual_seed(0)
    prompts = [random_ids(g, w["prompt_len"], cfg.vocab_size) for _ in range(w["prompts"])]
    B, P, T = len(prompts), w["prompt_len"], w["new_tokens"]
    ids = torch.tensor(prompts)
    batch = prompt_batch(m, prompts)
    with torch.no_grad():  # the same weights: the same next-token logits on the prompts
        diff = (m(batch["embeds"])[:, -1] - hf(ids).logits[:, -1]).abs().max().item()
    gens = [torch.Generator().manual_seed(i) for i in range(B)]

    def ours():
        return m.generate(batch["embeds"], batch["im_mask"], batch["attention_mask"], T, TEMPERATURE,
                          stop_ids=[-1], generator=gens)

    def theirs():  # sampling from the full distribution, as ours: no top-k (transformers' default is 50)
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=TEMPERATURE,
                           top_k=0, top_p=1.0, max_new_tokens=T, use_cache=True)
    t = timed({"ours": ours, "theirs": theirs}, w["runs"])
    assert ours().shape == (B, T) and theirs().shape == (B, P + T)
    flops = generate_flops(cfg, B, P, T)
    return row(side(B * T, t["ours"], flops, peak, "tokens"), side(B * T, t["theirs"], flops, peak, "tokens"),
               prefill_logits_max_diff=diff, work=f"{B} prompts x {P} tokens, {T} new tokens each, T={TEMPERATURE}")


def bon4_vs_hf(tf, cfg_kw, w, peak, n=4):
    models = build_models(cfg_kw, ["output", "score"])
    pi, rm = models["output"], models["score"]
    hf_pi, hf_rm = llama_twin(tf, pi, tf.LlamaForCausalLM), llama_twin(tf, rm, tf.LlamaForSequenceClassification)
    cfg, g = pi.cfg, torch.Generator().manual_seed(1)
    prompts = [random_ids(g, w["prompt_len"], cfg.vocab_size) for _ in range(w.get("bon_prompts", w["prompts"]))]
    P, T = w["prompt_len"], w["new_tokens"]

    def ours():  # bon.best_of_n per prompt: one prefill, n rows sampled (bon.sample_candidates), n scored at once
        best = []
        for p in prompts:
            gens = [torch.Generator().manual_seed(j) for j in range(n)]
            batch = prompt_batch(pi, [p])
            out = pi.generate(batch["embeds"], batch["im_mask"], batch["attention_mask"], T, TEMPERATURE,
                              stop_ids=[-1], generator=gens, n=n)
            with torch.no_grad():
                scores = rm.rewards_alone([([p + o], []) for o in out.tolist()])
            best.append(int(scores.argmax()))
        return best

    def theirs():
        best = []
        for p in prompts:
            ids = torch.tensor([p])
            out = hf_pi.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=TEMPERATURE,
                                 top_k=0, top_p=1.0, max_new_tokens=T, num_return_sequences=n)
            with torch.no_grad():
                scores = hf_rm(out).logits.squeeze(-1)
            best.append(int(scores.argmax()))
        return best
    # the same weights: our reward model and the twin score the same sequences alike
    seqs = torch.tensor([p + random_ids(g, T, cfg.vocab_size) for p in prompts])
    with torch.no_grad():
        diff = (rm.rewards_alone([([s], []) for s in seqs.tolist()]) - hf_rm(seqs).logits.squeeze(-1)).abs().max()
    t = timed({"ours": ours, "theirs": theirs}, w["runs"])
    C = len(prompts)
    score = fwd_flops(cfg, n, P + T)
    f_ours = C * (generate_flops(cfg, n, P, T, prefill_rows=1) + score)
    f_theirs = C * (generate_flops(cfg, n, P, T) + score)  # num_return_sequences expands the prompt before prefill
    return row(side(C, t["ours"], f_ours, peak, "prompts"), side(C, t["theirs"], f_theirs, peak, "prompts"),
               score_max_diff=diff.item(), work=f"{C} prompts x {P} tokens, best of {n} x {T} new tokens")


# ----------------------------------------------------------------------------------------------------------------
# rm_train_vs_trl


def rm_pairs(cfg, w, seed=2):
    """Pairs sharing a prompt: chosen answer of pair_answer tokens, rejected of half that (padding on both sides)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(w["pairs"] * w["rm_steps"] * (w["runs"] + 1)):
        prompt = random_ids(g, w["pair_prompt"], cfg.vocab_size)
        out.append((prompt + random_ids(g, w["pair_answer"], cfg.vocab_size),
                    prompt + random_ids(g, w["pair_answer"] // 2, cfg.vocab_size)))
    return out


class StepTimes:
    """A transformers TrainerCallback that times each optimizer step from the end of the previous one (so the
    batch's collation and the last step's logging count), and calls `between(step)` after it, untimed."""

    def __init__(self, tf, between):
        class CB(tf.TrainerCallback):
            def on_train_begin(cb, *a, **k):
                self.t0 = time.perf_counter()

            def on_step_end(cb, args, state, control, **k):
                self.times.append(time.perf_counter() - self.t0)
                between(state.global_step)
                self.t0 = time.perf_counter()
        self.callback, self.times, self.t0 = CB(), [], None


def trl_args(cls, out, **kw):
    """TRL's config with its defaults but for: fp32 (the comparison's), no gradient checkpointing (ours does not
    checkpoint either; TRL turns it on for memory), no reports, checkpoints or progress bar."""
    return cls(output_dir=out, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
               disable_tqdm=True, use_cpu=True, seed=0, **kw)


def rm_train_vs_trl(tf, cfg_kw, w, peak):
    import datasets
    import trl
    rm = build_models(cfg_kw, ["score"])["score"].train()
    hf = llama_twin(tf, rm, tf.LlamaForSequenceClassification).train()
    cfg, B, steps = rm.cfg, w["pairs"], w["rm_steps"] * (w["runs"] + 1)  # a warm-up run, then the timed ones
    pairs = rm_pairs(cfg, w)
    budget = 2 * B * (w["pair_prompt"] + w["pair_answer"])  # --token-budget: the step's pairs in one micro-batch
    # train.py --stage rm: AdamW as make_optimizer builds it; TRL's defaults: weight decay 0, betas (0.9, 0.999)
    opt = common.make_optimizer(rm, LR, 0.0, 0.999)
    trainable = [p for p in rm.parameters() if p.requires_grad]
    losses, ours_times = [], []

    def ours_step(k):  # train.train_rm's step on pairs k*B .. (k+1)*B: micro-batches, Eq. 1, one optimizer step
        t0 = time.perf_counter()
        mine = list(range(k * B, (k + 1) * B))
        lengths = [len(pairs[i][0]) for i in mine]
        total = 0.0
        for mb in batching.micro_batches(lengths, budget, 1, False, torch.device("cpu")):
            seqs = [([s], []) for i in mb for s in pairs[mine[i]]]
            r = rm.pair_rewards(seqs)
            loss = LAUNCHER["bt_loss"](r[0::2], r[1::2])
            (loss / B).backward()
            total += loss.item()
        common.clip_and_step(trainable, opt, 1.0)
        ours_times.append(time.perf_counter() - t0)
        losses.append(total / B)

    tok = id_tokenizer(tf, cfg.vocab_size, cfg.pad_token_id)
    ds = datasets.Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})
    trl_losses = []
    with tempfile.TemporaryDirectory() as out:
        timer = StepTimes(tf, lambda step: ours_step(step - 1))
        args = trl_args(trl.RewardConfig, out, per_device_train_batch_size=B, learning_rate=LR, max_steps=steps,
                        lr_scheduler_type="constant", train_sampling_strategy="sequential", max_length=None)
        trainer = quiet(trl.RewardTrainer(model=hf, args=args, train_dataset=ds, processing_class=tok,
                                          callbacks=[timer.callback]), tf)
        compute_loss = trainer.compute_loss

        def logged(*a, **k):
            loss = compute_loss(*a, **k)
            trl_losses.append(loss.item())
            return loss
        trainer.compute_loss = logged
        trainer.train()
    runs = [slice((r + 1) * w["rm_steps"], (r + 2) * w["rm_steps"]) for r in range(w["runs"])]
    t_ours, t_theirs = [sum(ours_times[s]) for s in runs], [sum(timer.times[s]) for s in runs]
    P, R = w["pair_prompt"], w["pair_answer"]
    n = w["rm_steps"] * B
    # ours: the prompt once, both answers after it (pair_rewards); TRL: 2B rows padded to the longer side
    f_ours = 3 * n * (fwd_flops(cfg, 1, P) + fwd_flops(cfg, 2, R, past=P))
    f_theirs = 3 * n * fwd_flops(cfg, 2, P + R)
    return row(side(n, t_ours, f_ours, peak, "pairs"), side(n, t_theirs, f_theirs, peak, "pairs"),
               first_loss=losses[0], first_loss_trl=trl_losses[0], first_loss_diff=abs(losses[0] - trl_losses[0]),
               optimizer_steps=[len(ours_times), len(timer.times)],
               work=f"{B} pairs/step of a {P}-token prompt + answers of {R} and {R // 2} tokens, "
                    f"{w['rm_steps']} step(s) per run, lr {LR}, fp32")


# ----------------------------------------------------------------------------------------------------------------
# rloo_vs_trl, ppo_vs_trl: one iteration = a rollout (generation, then scoring: reward model, old and reference
# log-probs, values) and epochs x mini-batches optimizer steps


class Split:
    """Seconds spent inside wrapped callables, by phase."""

    def __init__(self):
        self.s = {}

    def wrap(self, phase, fn):
        @functools.wraps(fn)
        def timed_fn(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[phase] = self.s.get(phase, 0.0) + time.perf_counter() - t0
        return timed_fn


def rl_setup(tf, cfg_kw, w, algo, out):
    """Our four roles (policy, reference, reward model, critic for PPO) with random weights, the parsed settings
    of `train.py --stage ppo --algo ALGO`, the prompts as our sampler reads them and their token ids; the twins
    saved to out/policy and out/rm (TRL builds its reference and reads its reward model from files)."""
    from data import Tokenizer
    models = build_models(cfg_kw, ["output", "score"])
    policy, rm = models["output"], models["score"]
    ref = init_weights(InternLMXComposer2(policy.cfg), 0).eval().requires_grad_(False)  # the same seed: a copy
    critic = init_weights(RewardModel(rm.cfg), 1) if algo == "ppo" else None  # as load_roles: from the RM
    tok = Tokenizer(Path(__file__).resolve().parent / "checkpoints" / "world-sft" / "tokenizer.model")
    for m in (policy, ref, rm, critic):
        if m is not None:
            m.tokenizer = tok
    k = w["rloo_k"] if algo == "rloo" else 1
    n_resp, T = w["rl_prompts"] * k, w["rl_new_tokens"]
    a = LAUNCHER["parse_args"](["--stage", "ppo", "--algo", algo, "--rm", str(out / "rm"), "--batch", str(n_resp),
                          "--max-new-tokens", str(T), "--ppo-epochs", str(w["epochs"]), "--mini-batches",
                          str(w["mini_batches"]), "--rloo-k", str(w["rloo_k"]), "--lr", str(LR), "--kl-coef", "0.05",
                          "--temperature", str(TEMPERATURE), "--no-normalize-reward", "--out", str(out / "ours")])
    dev = torch.device("cpu")
    policy = ppo.trained(policy, a)
    roles = ppo.Roles(ppo.PolicyLogprobs(policy, a.temperature, dev), ppo.PolicyLogprobs(ref, a.temperature, dev),
                      ppo.CriticValues(ppo.trained(critic, a), (0.0, 1.0), dev) if critic is not None else None,
                      [ppo.RewardScore(rm.requires_grad_(False), "rm0", False, dev)])
    g = torch.Generator().manual_seed(3)
    texts = [tok.decode(random_ids(g, w["prompt_len"], tok.vocab_size)) for _ in range(w["rl_prompts"])]
    prompts = [(t, [], None) for t in texts]
    ids = [policy.sequence(t)[0][0] for t in texts]
    # --token-budget: every forward over the whole batch (the reward template adds 4 tokens), as TRL runs them
    a.token_budget = n_resp * (max(map(len, ids)) + T + 8)
    for twin, name, cls in ((policy, "policy", tf.LlamaForCausalLM), (rm, "rm", tf.LlamaForSequenceClassification)):
        llama_twin(tf, twin, cls).save_pretrained(out / name)
        id_tokenizer(tf, twin.cfg.vocab_size, twin.cfg.pad_token_id).save_pretrained(out / name)
    return a, roles, prompts, ids


def rl_flops(cfg, C, k, P, T, epochs, critic, shared_prefill):
    """One iteration's model FLOPs: generation (the prompts prefilled once, or once per sample), scoring (reward
    model, old and reference log-probs over the whole sequences; the critic's values), the update (forward and
    backward of the policy, and the critic, each epoch)."""
    R = C * k
    gen = C * generate_flops(cfg, k, P, T, prefill_rows=1 if shared_prefill else k)
    seq = fwd_flops(cfg, R, P + T)
    head = 2 * cfg.vocab_size * cfg.hidden_size * R * T
    score = seq + 2 * (seq + head) + (seq if critic else 0)
    update = epochs * 3 * ((seq + head) + (seq if critic else 0))
    return gen + score + update


def ours_iterations(a, roles, prompts, split):
    """ppo.train's iteration through ppo's public functions: collect_rollouts, compute_advantages, ppo_update."""
    policy = roles.policy.model
    critic = roles.critic.model if roles.critic is not None else None
    opt_pi = common.make_optimizer(policy, a.lr, 0.0, 0.999)  # TRL's AdamW defaults: weight decay 0, beta2 0.999
    opt_v = common.make_optimizer(critic, 5 * a.lr, 0.0, 0.999) if critic is not None else None
    # no stop token (bench.bench_bon does the same): every response is max_new_tokens long, as on TRL's side
    policy.generate = split.wrap("generation", functools.partial(policy.generate, stop_ids=[-1]))
    dev, k = torch.device("cpu"), a.rloo_k if a.algo == "rloo" else 1

    def iteration(step):
        gens = [torch.Generator().manual_seed(ppo.sample_seed(a.seed, step, j)) for j in range(len(prompts) * k)]
        t0 = time.perf_counter()
        ro = ppo.collect_rollouts(roles, prompts, a, dev, gens)
        t1 = time.perf_counter()
        split.s["rollout"] = split.s.get("rollout", 0.0) + t1 - t0
        ppo.compute_advantages(ro, a)
        for m in (policy, critic):
            if m is not None:
                m.train()
        ppo.ppo_update(roles.policy, roles.critic, ro, opt_pi, opt_v, a, dev, 1)
        split.s["update"] = split.s.get("update", 0.0) + time.perf_counter() - t1
        return ro
    return iteration


def phases(split, iterations):
    """Seconds per iteration: generation, scoring (the rest of the rollout), update."""
    s = split.s
    return {"generation": s.get("generation", 0.0) / iterations,
            "scoring": (s.get("rollout", 0.0) - s.get("generation", 0.0)) / iterations,
            "update": s.get("update", 0.0) / iterations}


def interleaved(tf, ours, per_iter, runs, ours_split, their_split):
    """A TrainerCallback that runs our iteration after each of TRL's (every per_iter optimizer steps), and the
    list our iterations' seconds go to. The phases count from the end of the warm-up iteration on both sides."""
    ours_times = []

    def between(step):
        if step % per_iter == 0:
            if step == per_iter:
                their_split.s.clear()
            t0 = time.perf_counter()
            ours(step // per_iter)
            ours_times.append(time.perf_counter() - t0)
            if step == per_iter:
                ours_split.s.clear()
    return StepTimes(tf, between), ours_times


def rl_row(cfg, ids, w, algo, timer, per_iter, ours_times, ours_split, their_split, peak, **extra):
    runs, k = w["runs"], w["rloo_k"] if algo == "rloo" else 1
    theirs_times = [sum(timer.times[i * per_iter:(i + 1) * per_iter]) for i in range(runs + 1)]
    C, P, T, E, M = len(ids), statistics.mean(map(len, ids)), w["rl_new_tokens"], w["epochs"], w["mini_batches"]
    r = row(side(C, ours_times[1:], rl_flops(cfg, C, k, P, T, E, algo == "ppo", True), peak, "prompts"),
            side(C, theirs_times[1:], rl_flops(cfg, C, k, P, T, E, algo == "ppo", False), peak, "prompts"),
            optimizer_steps=[len(ours_times) * per_iter, len(timer.times)],
            work=f"{C} prompts of {P:.0f} tokens x {k} sample(s) of {T} new tokens, {E} epochs x {M} mini-batches, "
                 f"KL coef 0.05, fp32", **extra)
    r["ours"]["phases"] = phases(ours_split, runs)
    theirs = phases(their_split, runs)
    theirs["update"] = statistics.mean(theirs_times[1:]) - theirs["generation"] - theirs["scoring"]
    r["theirs"]["phases"] = theirs
    return r


def quiet(trainer, tf):
    """No per-step log lines on stdout (TRL's PrinterCallback, on when the progress bar is off)."""
    trainer.remove_callback(tf.PrinterCallback)
    return trainer


def rloo_vs_trl(tf, cfg_kw, w, peak):
    import datasets
    import trl
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        a, roles, prompts, ids = rl_setup(tf, cfg_kw, w, "rloo", out)
        ours_split, their_split = Split(), Split()
        k, E, M, T = w["rloo_k"], w["epochs"], w["mini_batches"], w["rl_new_tokens"]
        per_iter = E * M  # TRL's optimizer steps per generation: steps_per_generation x num_iterations
        timer, ours_times = interleaved(tf, ours_iterations(a, roles, prompts, ours_split), per_iter, w["runs"],
                                        ours_split, their_split)
        tok = tf.AutoTokenizer.from_pretrained(out / "policy")
        # a trailing space: TRL scores prompt + completion as one string, which must split between the two
        ds = datasets.Dataset.from_dict({"prompt": [ids_text(p) + " " for p in ids] * (w["runs"] + 1)})
        args = trl_args(trl.RLOOConfig, str(out / "trl"), per_device_train_batch_size=len(ids) * k // M,
                        steps_per_generation=M, num_iterations=E, num_generations=k, max_completion_length=T,
                        temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=0.05, learning_rate=LR,
                        max_steps=(w["runs"] + 1) * per_iter, lr_scheduler_type="constant")
        trainer = quiet(trl.RLOOTrainer(model=str(out / "policy"), reward_funcs=str(out / "rm"), args=args,
                                        train_dataset=ds, processing_class=tok, reward_processing_classes=tok,
                                        callbacks=[timer.callback]), tf)
        trainer._generate = their_split.wrap("generation", trainer._generate)
        trainer._generate_and_score_completions = their_split.wrap("rollout", trainer._generate_and_score_completions)
        trainer.train()
    return rl_row(roles.policy.model.cfg, ids, w, "rloo", timer, per_iter, ours_times, ours_split, their_split, peak)


def ppo_vs_trl(tf, cfg_kw, w, peak):
    import datasets
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        a, roles, prompts, ids = rl_setup(tf, cfg_kw, w, "ppo", out)
        ours_split, their_split = Split(), Split()
        E, M, T, C = w["epochs"], w["mini_batches"], w["rl_new_tokens"], len(ids)
        timer, ours_times = interleaved(tf, ours_iterations(a, roles, prompts, ours_split), 1, w["runs"],
                                        ours_split, their_split)
        tok = tf.AutoTokenizer.from_pretrained(out / "policy")
        tok.padding_side = "left"
        policy, ref = (tf.LlamaForCausalLM.from_pretrained(out / "policy") for _ in range(2))
        rm, critic = (tf.LlamaForSequenceClassification.from_pretrained(out / "rm") for _ in range(2))
        ds = datasets.Dataset.from_dict({"input_ids": ids * (w["runs"] + 1)})
        args = trl_args(PPOConfig, str(out / "trl"), per_device_train_batch_size=C, num_mini_batches=M,
                        num_ppo_epochs=E, response_length=T, temperature=TEMPERATURE, kl_coef=0.05,
                        learning_rate=LR, total_episodes=C * (w["runs"] + 1), num_sample_generations=0,
                        lr_scheduler_type="constant")
        trainer = quiet(PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                                   value_model=critic, train_dataset=ds, callbacks=[timer.callback]), tf)
        # the phases: generation; scoring is every forward without gradient (reward, values, old and reference
        # log-probs) outside generation; the update is the rest
        saved = {f: getattr(ppo_trainer, f) for f in ("batch_generation", "forward", "get_reward")}

        def scoring(fn):
            no_grad = their_split.wrap("scoring", fn)
            return lambda *a, **k: fn(*a, **k) if torch.is_grad_enabled() else no_grad(*a, **k)
        try:
            ppo_trainer.batch_generation = their_split.wrap("generation", saved["batch_generation"])
            ppo_trainer.forward, ppo_trainer.get_reward = scoring(saved["forward"]), scoring(saved["get_reward"])
            trainer.train()
        finally:
            for f, fn in saved.items():
                setattr(ppo_trainer, f, fn)
    their_split.s["rollout"] = their_split.s.get("generation", 0.0) + their_split.s.get("scoring", 0.0)
    r = rl_row(roles.policy.model.cfg, ids, w, "ppo", timer, 1, ours_times, ours_split, their_split, peak)
    r["optimizer_steps"] = [n * E * M for n in r["optimizer_steps"]]  # TRL counts an iteration as one step
    return r


# ----------------------------------------------------------------------------------------------------------------


ROWS = {"generate_vs_hf": generate_vs_hf, "bon4_vs_hf": bon4_vs_hf, "rm_train_vs_trl": rm_train_vs_trl,
        "rloo_vs_trl": rloo_vs_trl, "ppo_vs_trl": ppo_vs_trl}


def run(quick=False, only=None):
    """Every row at both sizes (QUICK's tiny shapes with --quick): {key: {size: row}}, and the printed table."""
    import transformers as tf
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, TRL's experimental API
    warnings.filterwarnings("ignore", message=".*experimental.*")
    peak = common.matmul_gflops() * 1e9
    sizes = {"quick": QUICK_SIZE} if quick else SIZES
    results = {"matmul_gflops": peak / 1e9}
    print(f"peers on cpu ({torch.get_num_threads()} threads), fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"ratio = ours / theirs in throughput", flush=True)
    for key in only or ROWS:
        if key not in ROWS:
            raise SystemExit(f"error: --peers {key}: no such row; the rows are {', '.join(ROWS)}")
        for size, cfg_kw in sizes.items():
            w = QUICK if quick else WORK[size]
            torch.manual_seed(0)
            t0 = time.perf_counter()
            row_peak = common.matmul_gflops() * 1e9  # the machine's speed now: other jobs share these cores
            try:
                r = dict(ROWS[key](tf, cfg_kw, w, row_peak), matmul_gflops=row_peak / 1e9)
            except ModuleNotFoundError as e:  # the peers' packages are test-only (requirements-test.txt)
                if e.name not in ("trl", "datasets"):
                    raise
                r = {"skipped": f"{e.name} is not installed (pip install -r requirements-test.txt)"}
            results.setdefault(key, {})[size] = r
            print(fmt_row(key, size, r, time.perf_counter() - t0), flush=True)
    return results


def fmt_row(key, size, r, seconds):
    if "skipped" in r:
        return f"{key:16} {size:5} skipped: {r['skipped']}"
    o, t = r["ours"], r["theirs"]
    unit = next(k for k in o if k.endswith("_per_s"))
    lo, hi = r["ratio_range"]
    return (f"{key:16} {size:5} x{r['ratio']:.2f} ({lo:.2f}-{hi:.2f})  ours {o[unit]:.3g} {unit} MFU {o['mfu']:.1%}"
            f"  theirs {t[unit]:.3g} MFU {t['mfu']:.1%}  (mm {r['matmul_gflops']:.0f} GFLOP/s, {seconds:.0f} s) "
            f"{r['work']}" + "".join(f"\n{'':23}{s} phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                          r[s]["phases"].items())
                                     for s in ("ours", "theirs") if "phases" in r[s]))
