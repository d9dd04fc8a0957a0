"""Speed and memory benchmarks of the IXC-2.5 / IXC-2.5-Reward implementation, on CPU or CUDA.

    python bench.py                        # full sizes (repeat counts budgeted for < 3 min on 2 idle CPU cores)
    python bench.py --quick                # every size shrunk: a smoke run
    python bench.py --only prefill_vs_hf decode_flatness --json bench.json
    python bench.py --quick --only bon_cost --profile      # also the top ops of each timed callable
    python bench.py --peers --json peers.json   # ours vs TRL and transformers on the same weights (peers.py)

Every number is printed next to its target; nothing is asserted (timings depend on the machine and its load).
Comparisons with transformers load the same weights into both models and interleave their runs (a, b, a, b, ...)
so that background load hits both alike; times are medians. On a machine busy with other work, `--threads 1` avoids
OpenMP threads spinning against the other job (on 2 shared cores that slowed small ops here by 30-100x).
"""
import argparse
import functools
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import bon  # noqa: E402
import batching  # noqa: E402
import data  # noqa: E402
from world import WORLD_CONFIG, WORLD_SFT, store  # noqa: E402
from model import Config, InternLM2Model, InternLMXComposer2, KVCache, init_weights  # noqa: E402
from reward import RewardModel  # noqa: E402
from vision import CLIPVisionTower, VisionConfig  # noqa: E402

SHARED = Path(os.environ.get("IXC_SHARED", ROOT.parent / "shared"))
TOKENIZER = SHARED / "assets" / "internlm2" / "tokenizer.model"
VL_REWARDBENCH = SHARED / "assets" / "preference" / "vl_rewardbench_data.jsonl"
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                   patch_size=14)  # tests/conftest.py TINY's vision_config
BON_PROMPT = "Describe the picture in detail, then list every object you can see."
FULL = dict(
    # the mid-size decoder, 4:1 GQA; a small vocab since only the trunk is timed (an embedding lookup is free)
    decoder=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=1024),
    plora_rank=256, seq=1024, reps=3,  # 256 is the real IXC-2.5 rank
    vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=560,
                patch_size=14), crops=4,
    decode_ctx=(64, 256, 1024), decode_steps=16,
    bon=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2), bon_tokens=32,
    train_seq=512, train_reps=2, matmul=2048,  # an RM step sees one (chosen, rejected) pair of 512 tokens
    ckpt=dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              num_hidden_layers=2, plora_rank=256))
QUICK = dict(
    decoder=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=256),
    plora_rank=64, seq=256, reps=3,
    vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                patch_size=14), crops=2,
    decode_ctx=(16, 64, 256), decode_steps=8,
    bon=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2), bon_tokens=8,
    train_seq=128, train_reps=2, matmul=512,
    ckpt=dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2,
              num_hidden_layers=2, plora_rank=32))
# --gpu-check on one CUDA GPU: InternLM2-7B's decoder for inference (random bf16 weights: nothing can be
# downloaded there), a model that fits a training step for the RM step's MFU
GPU = dict(FULL, decoder=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=92544),
           seq=4096, decode_ctx=(512, 2048, 4096), decode_steps=32, crops=10,
           vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=560, patch_size=14),
           bon=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8), bon_tokens=64, matmul=8192, train_seq=2048)
GPU_TRAIN = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=92544)
# keys shown in the table, with (comparison, target[, sub-key]) or None; other keys go to --json only
TARGETS = {"prefill_vs_hf": (">=", 1.0), "prefill_plora_vs_hf": None, "vision_vs_hf": (">=", 1.0),
           "decode_ms_per_token": None, "decode_flatness": ("<=", 1.2), "bon_cost": ("<=", 2.0, "4"),
           "rm_train_mfu": (">=", 0.5), "rm_train_mfu_bf16": None, "rm_shared_prefix_speedup": None,
           "padding_waste": ("<=", 0.10), "logprob_peak_ratio": ("<=", 0.5), "logprob_time_ratio": None,
           "load_rss_ratio": ("<=", 1.15), "load_vs_read": ("<=", 1.5)}
# dense bf16 tensor-core peaks (FLOP/s) by device name, most specific first; other GPUs use a measured matmul
GPU_BF16_PEAK = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
                 ("L4", 121e12)]
PROFILE = False  # --profile


def medians(fns, reps, dev, warmup=1):
    """{name: callable} -> {name: median seconds}; runs interleaved so drift in the machine's load hits every one."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    if PROFILE:  # one more run of each under the profiler, after timing so it cannot skew the numbers
        for k, f in fns.items():
            with torch.profiler.profile() as prof:
                f()
                sync()
            sort = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            print(f"--- profile: {k}\n" + prof.key_averages().table(sort_by=sort, row_limit=12), flush=True)
    return {k: statistics.median(t) for k, t in times.items()}


def build(module, dev, dtype, seed=0):
    return init_weights(module, seed).to(device=dev, dtype=dtype).eval()


def llama_twin(tf, ours, cfg):
    """transformers.LlamaModel (sdpa) holding our rank-0 decoder's weights, wqkv unpacked as in tests/test_reference."""
    n_kv, hd, D = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    g = cfg.num_attention_heads // n_kv
    hf = tf.LlamaModel(tf.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=D, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads, num_key_value_heads=n_kv,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, attention_bias=False, mlp_bias=False,
        max_position_embeddings=4096, attn_implementation="sdpa"))
    sd = {"embed_tokens.weight": ours.tok_embeddings.weight, "norm.weight": ours.norm.weight}
    for i, layer in enumerate(ours.layers):
        p, wqkv, ff = f"layers.{i}.", layer.attention.wqkv.weight.view(n_kv, g + 2, hd, D), layer.feed_forward
        sd.update({p + "self_attn.q_proj.weight": wqkv[:, :g].reshape(-1, D),
                   p + "self_attn.k_proj.weight": wqkv[:, g].reshape(-1, D),
                   p + "self_attn.v_proj.weight": wqkv[:, g + 1].reshape(-1, D),
                   p + "self_attn.o_proj.weight": layer.attention.wo.weight, p + "mlp.gate_proj.weight": ff.w1.weight,
                   p + "mlp.up_proj.weight": ff.w3.weight, p + "mlp.down_proj.weight": ff.w2.weight,
                   p + "input_layernorm.weight": layer.attention_norm.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    hf.load_state_dict(sd, strict=True)  # copies into HF's own tensors
    return hf.eval()


# ----------------------------------------------------------------------------------------------------------------
# Measurements: each returns ({json key: value}, a note for the table)


def needs_transformers(fn):
    """Import transformers lazily (a test/bench-only dependency): without it the comparison is skipped."""
    @functools.wraps(fn)
    def wrapper(s, dev, dt):
        try:
            import transformers
        except ImportError:
            return {}, "skipped: transformers is not installed"
        transformers.logging.set_verbosity_error()
        return fn(transformers, s, dev, dt)
    return wrapper


@needs_transformers
def bench_prefill(tf, s, dev, dt):
    cfg = Config(**s["decoder"], plora_rank=0)
    ours = build(InternLM2Model(cfg), dev, dt)
    lora = init_weights(InternLM2Model(Config(**s["decoder"], plora_rank=s["plora_rank"])), seed=1)
    lora.load_state_dict(ours.state_dict(), strict=False)  # the same base weights, plus the PLoRA matrices
    lora, hf = lora.to(dev, dt).eval(), llama_twin(tf, ours, cfg).to(dev, dt)
    S = s["seq"]
    x = torch.randn(1, S, cfg.hidden_size, device=dev, dtype=dt)
    im_mask = torch.arange(S, device=dev)[None] < S // 2  # a prompt that opens with its image: PLoRA on half
    with torch.no_grad():
        t = medians({"ours": lambda: ours(x), "ours_plora": lambda: lora(x, im_mask=im_mask),
                     "hf": lambda: hf(inputs_embeds=x, use_cache=False)}, s["reps"], dev)
    tps = {k: S / v for k, v in t.items()}
    return ({"prefill_vs_hf": t["hf"] / t["ours"], "prefill_plora_vs_hf": t["hf"] / t["ours_plora"],
             "prefill_tokens_per_s": tps},
            "tok/s " + ", ".join(f"{k} {v:.0f}" for k, v in tps.items()) + f" (seq {S}, {str(dt)[6:]})")


@needs_transformers
def bench_vision(tf, s, dev, dt):
    vc = dict(s["vision"], hidden_act="quick_gelu", layer_norm_eps=1e-5)
    hf = tf.CLIPVisionModel(tf.CLIPVisionConfig(**vc, attn_implementation="sdpa")).eval()
    ours = CLIPVisionTower(VisionConfig(**vc)).eval()
    # transformers 4.x nests under `vision_model.`, 5.x flattens CLIPVisionModel (the same mapping as the tests)
    ours.load_state_dict({"vision_tower.vision_model." + k.removeprefix("vision_model."): v
                          for k, v in hf.state_dict().items() if "post_layernorm" not in k and "position_ids" not in k})
    hf, ours = hf.to(dev, dt), ours.to(dev, dt)
    px = torch.randn(s["crops"], 3, vc["image_size"], vc["image_size"], device=dev, dtype=dt)
    with torch.no_grad():
        t = medians({"ours": lambda: ours(px), "hf": lambda: hf(pixel_values=px)}, s["reps"], dev)
    return {"vision_vs_hf": t["hf"] / t["ours"]}, \
        f"ours {t['ours'] * 1e3:.0f} ms, HF {t['hf'] * 1e3:.0f} ms ({s['crops']} crops of {vc['image_size']} px)"


def bench_decode(s, dev, dt):
    cfg = Config(**s["decoder"], plora_rank=0)
    model = build(InternLM2Model(cfg), dev, dt)
    ctxs, T = s["decode_ctx"], s["decode_steps"]
    cache = KVCache(cfg, 1, max(ctxs) + T, dt, dev)
    tok = torch.randn(1, 1, cfg.hidden_size, device=dev, dtype=dt)

    def steps(ctx):
        cache.len = ctx  # rewind: the first ctx slots hold a valid prefix, the decoded ones get overwritten
        for _ in range(T):
            model(tok, cache=cache)
    with torch.no_grad():
        model(torch.randn(1, max(ctxs), cfg.hidden_size, device=dev, dtype=dt), cache=cache)  # one prefill for all
        t = medians({str(c): functools.partial(steps, c) for c in ctxs}, s["reps"], dev)
    ms = {k: v / T * 1e3 for k, v in t.items()}
    return {"decode_ms_per_token": ms, "decode_flatness": ms[str(ctxs[-1])] / ms[str(ctxs[0])]}, \
        "ms/token " + ", ".join(f"ctx {k}: {v:.2f}" for k, v in ms.items()) + f" (flatness {ctxs[-1]}/{ctxs[0]})"


def bench_bon(s, dev, dt):
    if not TOKENIZER.is_file():
        return {}, f"skipped: {TOKENIZER} not found (the real tokenizer fixes the vocab at 92544)"
    kw = dict(s["bon"], vision_config=TINY_VISION)
    policy = build(InternLMXComposer2(Config(**kw)), dev, dt)
    rm = build(RewardModel(Config(**kw, head="score")), dev, dt, seed=1)
    policy.tokenizer = rm.tokenizer = data.Tokenizer(TOKENIZER)
    # no token id is -1: no candidate stops early, all N generate exactly bon_tokens tokens
    policy.generate = functools.partial(policy.generate, stop_ids=[-1])

    def run(n):
        bon.best_of_n(policy, [rm], BON_PROMPT, n=n, temperature=1.0, max_new_tokens=s["bon_tokens"], seed=0)
    t = medians({n: functools.partial(run, n) for n in (1, 4, 8)}, s["reps"], dev)
    return {"bon_cost": {"4": t[4] / t[1], "8": t[8] / t[1]}}, \
        f"best-of-1/4/8 {t[1] * 1e3:.0f}/{t[4] * 1e3:.0f}/{t[8] * 1e3:.0f} ms ({s['bon_tokens']} new tokens)"


def matmul_flops(n, dev, dtype, reps):
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / medians({"mm": lambda: torch.mm(a, b)}, 3 * reps, dev, warmup=2)["mm"]


def train_flops(s, dev, dtype):
    """FLOP/s of one RM step: forward + backward + AdamW on a (chosen, rejected) pair, Bradley-Terry loss on the
    last-token rewards. FLOPs = per sequence 6*N*seq + 12*layers*hidden*seq^2, with N the matmul parameters (no
    embeddings, no norms) and the attention term as in PaLM appendix B (QK^T and AV, fwd + bwd, causal not halved)."""
    cfg = Config(**s["decoder"], plora_rank=0)  # text-only pairs: PLoRA would never act
    trunk = build(InternLM2Model(cfg), dev, dtype).train()
    score = build(nn.Linear(cfg.hidden_size, 1, bias=False), dev, dtype).train()
    opt = torch.optim.AdamW([*trunk.parameters(), *score.parameters()], lr=1e-5)
    S = s["train_seq"]
    ids = torch.randint(cfg.vocab_size, (2, S), device=dev)

    def step():
        r = score(trunk(trunk.tok_embeddings(ids))[:, -1]).float().squeeze(-1)
        (-F.logsigmoid(r[0] - r[1])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t = medians({"rm_step": step}, s["train_reps"], dev)["rm_step"]
    n = score.weight.numel() + sum(p.numel() for k, p in trunk.named_parameters()
                                   if p.dim() == 2 and "tok_embeddings" not in k)
    return 2 * (6 * n * S + 12 * cfg.num_hidden_layers * cfg.hidden_size * S ** 2) / t, t


def bench_rm_shared_prefix(s, dev, dt):
    """Forward + backward of RM pairs whose sides share a prompt of train_seq tokens (in IXC-2.5, mostly HD image
    tokens) and differ in answers of train_seq / 8: each sequence scored alone, over the prompt run once per pair
    and both answers continued from its keys/values (RewardModel.pair_rewards, as train.py --stage rm does)."""
    cfg = Config(**s["decoder"], plora_rank=0, vision_config=TINY_VISION, head="score")
    rm = build(RewardModel(cfg), dev, torch.float32).train()
    g = torch.Generator().manual_seed(0)
    P, R, pairs = s["train_seq"], s["train_seq"] // 8, 4
    seqs = []
    for _ in range(pairs):
        prompt = torch.randint(3, cfg.vocab_size, (P,), generator=g).tolist()
        seqs += [([prompt + torch.randint(3, cfg.vocab_size, (R,), generator=g).tolist()], []) for _ in range(2)]

    def step(score):
        score(seqs).sum().backward()
        rm.zero_grad(set_to_none=True)
    t = medians({"alone": functools.partial(step, rm.rewards_alone),
                 "shared": functools.partial(step, rm.pair_rewards)}, s["train_reps"], dev)
    return {"rm_shared_prefix_speedup": t["alone"] / t["shared"]}, \
        f"{pairs} pairs, prompt {P} + answers {R} tokens: {t['alone']:.2f} s alone, {t['shared']:.2f} s shared (fp32)"


def bench_rm_train(s, dev, dt):
    peak = matmul_flops(s["matmul"], dev, torch.float32, s["reps"])
    achieved, t = train_flops(s, dev, torch.float32)
    out = {"rm_train_mfu": achieved / peak, "rm_train_flops_per_s": achieved, "matmul_flops_per_s": peak}
    note = f"step {t:.2f} s, {achieved / 1e9:.1f} GFLOP/s vs fp32 mm {s['matmul']}^2 {peak / 1e9:.1f} GFLOP/s"
    if dev.type == "cuda":  # bf16 against the GPU's tensor-core peak, measured if the device is not in the table
        name = torch.cuda.get_device_name(dev)
        bf_peak = next((p for k, p in GPU_BF16_PEAK if k in name), None) or \
            matmul_flops(4 * s["matmul"], dev, torch.bfloat16, s["reps"])
        achieved16, _ = train_flops(s, dev, torch.bfloat16)
        out.update(rm_train_mfu_bf16=achieved16 / bf_peak, bf16_peak_flops_per_s=bf_peak)
        note += f"; bf16 {achieved16 / 1e12:.1f} TFLOP/s vs {bf_peak / 1e12:.0f} ({name})"
    return out, note


def bench_logprobs(s, dev, dt):
    """PPO's log-prob pass over the real vocabulary (92,544), forward + backward: batching.token_logprobs (chunks of
    batching.LOGPROB_CHUNK tokens, recomputed in the backward) against the whole [B, T, V] log-softmax it replaced, in the same
    process: peak tensor bytes (bench.peak_tensor_bytes) and time."""
    B, T, D, V = 4, 512, s["decoder"]["hidden_size"], 92544  # 4 chunks: a micro-batch of 4 responses of 512
    head = build(nn.Linear(D, V, bias=False), dev, torch.float32)
    h = torch.randn(B, T, D, device=dev, requires_grad=True)
    targets = torch.randint(V, (B, T), device=dev)

    def whole():
        logp = torch.log_softmax(head(h).float(), -1)
        (-(logp.exp() * logp).sum(-1)).detach()
        logp.gather(-1, targets[..., None]).sum().backward()

    def chunked():
        batching.token_logprobs(head, h, targets)[0].sum().backward()
    peaks = {k: peak_tensor_bytes(f) for k, f in (("whole", whole), ("chunked", chunked))}
    t = medians({"whole": whole, "chunked": chunked}, s["reps"], dev)
    return {"logprob_peak_ratio": peaks["chunked"] / peaks["whole"], "logprob_time_ratio": t["chunked"] / t["whole"]}, \
        f"peak {peaks['whole'] / 2**20:.0f} -> {peaks['chunked'] / 2**20:.0f} MiB, {t['whole'] * 1e3:.0f} -> " \
        f"{t['chunked'] * 1e3:.0f} ms ({B} x {T} tokens, V {V}, fwd + bwd)"


def bench_padding(s, dev, dt):
    if not TOKENIZER.is_file() or not VL_REWARDBENCH.is_file():
        return {}, f"skipped: {TOKENIZER} or {VL_REWARDBENCH} not found"
    tok = data.Tokenizer(TOKENIZER)
    rows = data.read_rows(VL_REWARDBENCH)  # all rows even with --quick: about a second, and a subset shifts the number
    lengths = [len(tok.encode(data.reward_template([{"role": "user", "content": r["query"]},
                                                     {"role": "assistant", "content": a}])))
               for r in rows for a in r["response"]]  # text tokens only: the images are not shipped
    batches = batching.token_budget_batches(lengths, 8192, seed=0)
    return {"padding_waste": batching.padding_waste(lengths, batches)}, \
        f"{len(lengths)} sequences, {len(batches)} batches of <= 8192 tokens"


def write_checkpoint(s, out):
    """A reward checkpoint in the official layout with 7B-shaped layers, bf16, written by our save_pretrained."""
    cfg = Config(**s["ckpt"], vision_config=dict(TINY_VISION, image_size=560), head="score")
    torch.set_default_dtype(torch.bfloat16)  # allocate in bf16 straight away: no 3.3 GB fp32 copy
    try:
        with torch.device("meta"):
            model = RewardModel(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)  # values do not matter for loading, and filling is much faster than a random init
    model.to(torch.bfloat16).save_pretrained(out)
    if TOKENIZER.is_file():
        (out / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    else:  # any tokenizer with the InternLM2 special pieces will do
        store.train_world_tokenizer(["a tiny corpus for the load benchmark's tokenizer"], out / "tokenizer.model")
    return sum(f.stat().st_size for f in out.iterdir())


def bench_load(s, dev, dt):
    with tempfile.TemporaryDirectory() as d:
        nbytes = write_checkpoint(s, Path(d))
        buf = bytearray(1 << 24)
        for f in Path(d).iterdir():  # warm the page cache once (it is, having just been written), in small chunks
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        proc = subprocess.run([sys.executable, __file__, "--load-child", d], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"load subprocess failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["base"]
    return {"load_rss_ratio": grown / nbytes, "load_vs_read": r["load"] / r["read"], "load_child": r}, \
        f"{nbytes / 2 ** 20:.0f} MiB on disk, +{grown / 2 ** 20:.0f} MiB peak RSS; load {r['load']:.2f} s " \
        f"(from_pretrained {r['from_pretrained']:.2f} s + touch), read {r['read']:.2f} s"


def max_rss():
    """Peak RSS in bytes: VmHWM on Linux, as ru_maxrss also keeps the peak of the memory map from before exec, i.e.
    of the (large) parent process we were forked from, and would swamp the baseline."""
    try:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def load_child(ckpt, reps=3):
    """In a fresh interpreter: peak RSS of the first load over the baseline, then medians of load and of plainly
    reading every file's bytes, interleaved, all from a warm page cache. safetensors maps CPU tensors from the file
    without copying, so from_pretrained alone reads almost nothing: "load" also touches one element per 4 KiB page of
    every tensor, which is what the first forward pass would otherwise pay."""
    with torch.device("meta"):  # the first meta-device normal_ imports ~800 torch modules (~70 MB, fixed): not load
        nn.Embedding(2, 2)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: peak := current RSS, so no earlier spike hides the load
    except OSError:
        pass
    base, files = max_rss(), [f for f in Path(ckpt).iterdir() if f.is_file()]
    loads, lazy, reads = [], [], []
    for i in range(reps):
        t0 = time.perf_counter()
        model = RewardModel.from_pretrained(ckpt, dtype=torch.bfloat16)
        lazy.append(time.perf_counter() - t0)
        for t in [*model.parameters(), *model.buffers()]:
            t.detach().reshape(-1)[::max(1, 4096 // t.element_size())].sum()
        loads.append(time.perf_counter() - t0)
        peak = max_rss() if i == 0 else peak
        del model
        gc.collect()
        t0 = time.perf_counter()
        blobs = [f.read_bytes() for f in files]
        reads.append(time.perf_counter() - t0)
        del blobs
    print(json.dumps({"base": base, "peak": peak, "load": statistics.median(loads),
                      "from_pretrained": statistics.median(lazy), "read": statistics.median(reads)}))


# ----------------------------------------------------------------------------------------------------------------
# PPO under FSDP (torchrun): how the rollout samples from a sharded policy


def rollout_fsdp(quick, dev):
    """Under torchrun (--rollout-fsdp): sampling from an FSDP-sharded policy two ways, timed on every rank.
    copy: gather a whole copy once per rollout (common.unsharded_copy, what ppo.collect_rollouts does), then decode
    with no collective. layers: keep the policy sharded and let every decoder layer all-gather its weights at every
    decoding step (the root gathered once); every rank must then run the same number of steps, so no row may stop
    early (here none does: no stop token). Prints, on rank 0, the medians and the bytes each way all-gathers."""
    import common
    import ppo
    import torch.distributed as dist
    shapes = {"world": dict(WORLD_CONFIG, vocab_size=640),  # the shipped policy's shape
              "mid": dict(FULL["decoder"], vision_config=TINY_VISION)}
    C, P, T = (4, 32, 8) if quick else (8, 64, 32)   # prompts, prompt tokens, new tokens
    results = {}
    for name, shape in (list(shapes.items())[:1] if quick else shapes.items()):
        cfg = Config(**{"plora_rank": 8, **shape})
        policy = build(InternLMXComposer2(cfg), dev, torch.float32)
        policy.tokenizer = None
        for p in [*policy.vit.parameters(), *policy.vision_proj.parameters(), policy.plora_glb_GN, policy.plora_sub_GN]:
            p.requires_grad_(False)
        fwd = common.wrap(ppo.PolicyLogprobs(policy, 1.0, dev), dist.get_world_size(), fsdp=True)
        with torch.no_grad():  # FSDP2 initialises its root on the first forward through it: one row of 2 tokens
            fwd(ppo.Rollout.start([[5, 6]], [False], 0, [[[1, 5, 6]]], {"policy": [[]]}, [3], [None], [0]))
        common.release(fwd)
        g = torch.Generator().manual_seed(0)
        seqs = [([torch.randint(3, cfg.vocab_size, (P,), generator=g).tolist()], []) for _ in range(C)]

        def sample(model):
            batch = model.embed_batch(seqs, left_pad=True)
            gens = [torch.Generator(dev).manual_seed(i) for i in range(C)]
            return model.generate(batch["embeds"], batch["im_mask"], batch["attention_mask"], T, 1.0,
                                  stop_ids=[-1], generator=gens)

        def copy():
            return sample(common.unsharded_copy(policy))

        def layers():
            with torch.no_grad(), common.root_gathered(fwd):
                return sample(policy)
        assert torch.equal(copy(), layers())  # the same samples either way
        t = medians({"copy": copy, "layers": layers}, 3, dev)
        layer_bytes = sum(p.numel() * 4 for p in policy.model.layers.parameters())
        root_bytes = sum(p.numel() * 4 for n, p in policy.named_parameters()
                         if p.requires_grad and not n.startswith("model.layers."))
        results[name] = {"copy_s": t["copy"], "layers_s": t["layers"], "copy_gathered_bytes": layer_bytes + root_bytes,
                         "layers_gathered_bytes": (T + 1) * layer_bytes + root_bytes, "params": sum(
                             p.numel() for p in policy.parameters()), "prompts": C, "prompt_tokens": P, "new_tokens": T}
    if dist.get_rank() == 0:
        for name, r in results.items():
            print(f"rollout_fsdp {name} ({r['params'] / 1e6:.1f}M params, {dist.get_world_size()} ranks, {C} prompts "
                  f"x {P} tokens + {T} new): copy once {r['copy_s']:.3f} s, gathering {r['copy_gathered_bytes'] / 2 ** 20:.1f} MiB; "
                  f"per-layer gathers {r['layers_s']:.3f} s, gathering {r['layers_gathered_bytes'] / 2 ** 20:.1f} MiB "
                  f"(x{r['layers_s'] / r['copy_s']:.2f} the time)", flush=True)
    return results


# The memory model of `train.py --stage ppo`: bytes per GPU from config.json and the PPO settings

# IXC-2.5 7B (internlm-xcomposer2d5-7b's config.json; the vision tower, CLIP ViT-L/14 at 560 px: VisionConfig's)
IXC25_7B = dict(vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_scaling={"type": "dynamic", "factor": 2.0},
                max_position_embeddings=24576, max_length=16384)
# the 7B run the table assumes: train.py's recipe for ppo (batch 16, token budget 4096), responses up to 512 tokens,
# prompts of one image at hd_num 9 (a 3x3 grid of 560-px crops and the global view: 4081 tokens) and 512 of text
PPO_7B = dict(gpus=8, batch=16, token_budget=4096, max_new_tokens=512, image_tokens=4081, text_tokens=512,
              rollout_chunk=32, mini_batches=2, plora_rank=256)


def layer_activation_bytes(D, I, H, kv, r, autocast):
    """(bytes per token, extra bytes per token of a batch that carries an image mask) that autograd saves in one of
    model.py's decoder layers for its backward, the layer's input included: the norms' fp32 outputs, q/k/v (kept
    whole by v's view), RoPE'd q and k, attention out and its log-sum-exp, the SwiGLU's four intermediates; with an
    image mask, each of the five PLoRA linears' rank-r activations and its mask, on every token (PLoRA is dense
    under the mask). tests/test_ppo_memory.py checks this against autograd's saved tensors. Not included: the
    attention mask, which the attention kernel keeps as floats per layer, and the RoPE tables, shared by the
    layers."""
    if autocast:
        per_token = 4 * (6 * D + H + 3) + 2 * (3 * D + 3 * kv + 4 * I)
    else:
        per_token = 4 * (11 * D + 3 * kv + 4 * I + H + 3)
    return per_token, (2 if autocast else 4) * 5 * (r + 1)


def ppo_memory(config, gpus, fsdp=True, autocast=True, grad_ckpt=False, algo="ppo", rloo_k=4, batch=16,
               mini_batches=2, rollout_chunk=32, image_tokens=4081, text_tokens=512, max_new_tokens=512,
               token_budget=4096, reward_models=1, plora_rank=256, cpu=False):
    """Bytes per GPU of `train.py --stage ppo`, by component, and the peak of each phase: {name: bytes}. `config`: a
    config.json path or its dict. Every prompt is taken as `image_tokens` + `text_tokens` long and every response
    as `max_new_tokens`: the worst case the settings allow. Parameter counts come from model.py's own modules,
    built on the meta device.

    Static: the trained policy and critic (fp32, sharded under FSDP, their vision path whole) and their AdamW
    moments; the frozen reference and reward models (bf16 under autocast, sharded the same way).
    Rollout: the sampling copy (FSDP: the policy whole, in the autocast dtype), the KV cache of a chunk of prompts
    with room for every new token, the prefill's widest step; then, the copy freed, the widest scoring forward (a
    micro-batch of the token budget, no gradient) with the root it gathers.
    Update: one model's forward + backward at a time (ppo.ppo_update), the critic's with the policy's gradients
    already made: the activations autograd saves per layer (counted from model.py's layer, and checked against a
    measurement in tests/test_ppo_memory.py), the float attention mask the attention kernel keeps per layer,
    autocast's bf16 weight copies saved for the backward (none under checkpointing), the policy's log-softmax over
    a chunk of the vocabulary's logits, and under FSDP a gathered root and two gathered layers with their gradients.
    Loading: each model is whole until it is sharded, the critic last. Checkpoint: rank 0 gathers the policy (then
    the critic) whole with its AdamW moments, in host memory unless `cpu` (a CPU run, whose host memory is its
    device memory). Not modelled: the built-in world's held-out evaluation on rank 0 (world runs only)."""
    cfg = Config.from_json(config) if not isinstance(config, dict) else Config(**config)
    cfg.plora_rank = plora_rank
    with torch.device("meta"):
        policy, critic = InternLMXComposer2(cfg), InternLMXComposer2(Config(**{**cfg.__dict__, "head": "score"}))
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    vision = count([*policy.vit.parameters(), *policy.vision_proj.parameters(), policy.plora_glb_GN,
                    policy.plora_sub_GN])
    layers = count(policy.model.layers.parameters())
    layer_mm = count(p for p in policy.model.layers[0].parameters() if p.dim() == 2)
    n_pi, n_v = count(policy.parameters()) - vision, count(critic.parameters()) - vision
    D, I, L, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads
    hd, V, r, kv = cfg.head_dim, cfg.vocab_size, cfg.plora_rank, cfg.num_key_value_heads * cfg.head_dim
    with_critic = algo == "ppo"
    f = gpus if fsdp and gpus > 1 else 1            # how many ways the weights are split
    wb = 2 if autocast else 4                       # frozen weights, matmul outputs
    gen_b = wb if f > 1 else 4                      # one process / DDP: the fp32 policy samples itself
    n = 1 if with_critic else rloo_k
    prompts = max(1, batch // gpus // n)            # per rank (ppo.step_prompts)
    P, T = image_tokens + text_tokens, max_new_tokens
    rows_score = max(1, min(prompts * n, token_budget // (P + T)))
    rows_update = max(1, min(-(-prompts * n // mini_batches), token_budget // (P + T)))
    trained = n_pi + (n_v if with_critic else 0)
    mb = {}
    mb["policy + critic weights"] = trained * 4 / f + (2 if with_critic else 1) * vision * 4
    mb["AdamW moments"] = 8 * trained / f
    mb["reference + reward models"] = (n_pi + reward_models * n_v) * wb / f + (1 + reward_models) * vision * wb
    static = sum(mb.values())

    # rollout: sampling, then scoring. A forward without gradient holds one layer's widest step: the SwiGLU's
    # three intermediates and a few fp32 residuals per token, and the attention mask (bool, and as floats)
    no_grad_token, no_grad_row = 3 * I * wb + 16 * D, lambda length: length * length * (1 + wb)  # noqa: E731
    gen = min(rollout_chunk, prompts)
    mb["sampling copy of the policy"] = (n_pi + (vision if gen_b != 4 else 0)) * gen_b if f > 1 else 0
    cache = 2 * L * kv * gen_b * gen * n * (P + T)
    mb["KV cache"] = cache * (1 + 1 / n if n > 1 else 1)  # KVCache.repeat: the prompts' cache and its n copies
    mb["prefill"] = gen * (P * no_grad_token + no_grad_row(P)) + gen * n * V * 8
    gathered = (n_pi - layers + 2 * layers / L) * 4 if f > 1 else 0   # the policy's root and two layers
    # the log-probs a chunk of tokens at a time (batching.token_logprobs): the fp32 logits, their softmax and product
    logit_chunk = lambda rows: min(rows * T, batching.LOGPROB_CHUNK) * V * 12  # noqa: E731
    mb["scoring forward"] = rows_score * ((P + T) * no_grad_token + no_grad_row(P + T)) + logit_chunk(rows_score) \
        + gathered
    rollout = static + max(mb["sampling copy of the policy"] + mb["KV cache"] + mb["prefill"], mb["scoring forward"])

    # update
    per_token, per_plora_token = layer_activation_bytes(D, I, H, kv, r, autocast)
    tokens = rows_update * (P + T)
    layer = tokens * (per_token + (per_plora_token if image_tokens else 0)) + rows_update * (P + T) ** 2 * wb
    copies = 2 * layer_mm if autocast else 0
    acts = L * tokens * 4 * D + layer + copies if grad_ckpt else L * (layer + copies)
    # shared by the layers: RoPE tables, the image and attention masks; and the final norm
    mb["activations (one model)"] = acts + tokens * (8 * hd + 1 + 12 * D) + rows_update * (P + T) ** 2
    # backward: a chunk's logits recomputed, with their gradient (batching.token_logprobs checkpoints each chunk)
    mb["policy log-softmax over the vocabulary"] = logit_chunk(rows_update) * (2 if autocast else 1) \
        + rows_update * T * 8
    mb["FSDP: gathered root + 2 layers, their gradients"] = 2 * gathered
    mb["gradients (until the optimizer step)"] = trained * 4 / f
    update = static + mb["activations (one model)"] + 2 * gathered + \
        max(mb["policy log-softmax over the vocabulary"], n_pi * 4 / f)   # the critic's backward: policy grads made
    update = max(update, static + mb["gradients (until the optimizer step)"])

    # loading (ppo.load_roles): each model whole until it is sharded, the critic (fp32) last; on the CPU the
    # file's bytes and their copy (common.shard) both
    whole = lambda m: (m + vision) * 4 * (2 if cpu and f > 1 else 1)  # noqa: E731
    load = max(whole(n_pi), n_pi * 4 / f + vision * 4 + mb["reference + reward models"] + whole(n_v)
               if with_critic else 0)
    mb["checkpoint on rank 0 (host memory on GPUs)"] = 3 * max(n_pi, n_v) * 4 if f > 1 else 0
    save = static + (mb["checkpoint on rank 0 (host memory on GPUs)"] if cpu else V * D * 4 if f > 1 else 0)
    mb.update(load_peak=load, rollout_peak=rollout, update_peak=update, checkpoint_peak=save,
              peak=max(load, rollout, update, save))
    return mb


def print_ppo_memory(config=None):
    """The table of the README (markdown): GB per GPU on 8 GPUs under FSDP and bf16 autocast, PPO with and without
    --grad-ckpt and RLOO, for IXC-2.5 7B unless `config` (a config.json) says otherwise."""
    runs = {"ppo": dict(PPO_7B), "ppo --grad-ckpt": dict(PPO_7B, grad_ckpt=True),
            "rloo --grad-ckpt": dict(PPO_7B, grad_ckpt=True, algo="rloo")}
    tables = {k: ppo_memory(config or IXC25_7B, **v) for k, v in runs.items()}
    print("| GB per GPU | " + " | ".join(f"`{k}`" for k in tables) + " |\n|---|" + "---:|" * len(tables))
    for row in tables["ppo"]:
        bold = "**" if row.endswith("peak") else ""
        print(f"| {bold}{row.replace('_', ' ')}{bold} | " + " | ".join(f"{bold}{t[row] / 1e9:.1f}{bold}"
                                                                     for t in tables.values()) + " |")
    for gb in (80, 141):  # 5% kept for the allocator's fragmentation and the CUDA context
        print(f"| fits 8x{gb} GB | " + " | ".join("yes" if t["peak"] < gb * 1e9 * 0.95 else "no"
                                                 for t in tables.values()) + " |")
    return tables


def peak_tensor_bytes(fn):
    """Peak bytes of tensors allocated while fn() runs: the CUDA allocator's statistics. On the CPU, whose allocator
    keeps none: the running total that c10 keeps when its flag caffe2_report_cpu_memory_usage is set (every
    thread's allocations and frees: gloo's threads free some), read at each allocation the profiler records, plus
    the storages the profiler reports outside that total (a safetensors file read into memory, reported with a
    total of 0), from their allocation to their release."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    import ctypes
    from torch.profiler import ProfilerActivity, profile
    libc10 = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    ctypes.c_bool.in_dll(libc10, "FLAGS_caffe2_report_cpu_memory_usage").value = True
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo += node.children
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields))
    outside, peak = {}, 0
    for _, e in sorted(events, key=lambda x: x[0]):
        if e.alloc_size > 0 and e.total_allocated == 0:
            outside[e.ptr] = e.alloc_size
        elif e.alloc_size < 0 and e.ptr in outside and e.total_allocated == 0:
            del outside[e.ptr]
        peak = max(peak, e.total_allocated + sum(outside.values()))
    return peak


def ppo_settings(a, n_proc, device):
    """ppo_memory's settings for a parsed `train.py --stage ppo` run: its flags, and prompts as long as the longest
    one it draws (ppo.step_prompts over its iterations and ranks, image tokens from each image's size)."""
    import common
    import ppo
    from model import checkpoint_files, tensor_shapes, tokenize_segments
    from PIL import Image
    from vision import hd_grid, n_image_tokens
    init = Path(a.init or WORLD_SFT)
    cfg, tok = Config.from_json(init / "config.json"), data.Tokenizer(init / "tokenizer.model")
    plora = [s[0] for k, s in tensor_shapes(checkpoint_files(init)).items() if k.endswith("Plora_A.weight")]
    prompts, _ = ppo.ppo_prompts(a)
    longest = (0, 0)
    for step in range(a.steps):
        for rank in range(n_proc):
            for prompt, images, _ in ppo.step_prompts(prompts, a, step, rank, n_proc)[0]:
                text = sum(len(s) for s in tokenize_segments(tok, prompt, len(images)) if isinstance(s, list))
                hd = 6 if len(images) > 1 else a.hd_num
                crop, grid = cfg.vision.image_size, cfg.vision.image_size // cfg.vision.patch_size
                image = sum(n_image_tokens(*hd_grid(*Image.open(im).size, hd, crop), grid) for im in images)
                longest = max(longest, (text + image, image))
    return dict(config=str(init / "config.json"), gpus=n_proc, fsdp=a.fsdp, autocast=common.autocast_on(device, a.autocast),
                grad_ckpt=a.grad_ckpt, algo=a.algo, rloo_k=a.rloo_k, batch=a.batch, mini_batches=a.mini_batches,
                rollout_chunk=a.rollout_chunk, image_tokens=longest[1], text_tokens=longest[0] - longest[1],
                max_new_tokens=a.max_new_tokens, token_budget=a.token_budget, reward_models=len(a.rm),
                plora_rank=plora[0] if plora else 0, cpu=device.type == "cpu")


def check_ppo_memory(train_args):
    """Run `train.py --stage ppo` with `train_args` in this process (under torchrun: on every rank), measure its peak
    tensor memory, and print it next to ppo_memory's for the same settings, one JSON line per rank. The launcher is
    measured as the program it is: its file is run here, as torchrun would run it, not imported as a library."""
    import runpy
    launcher = runpy.run_path(str(ROOT / "train.py"), run_name="train_under_measurement")
    n_proc = int(os.environ.get("WORLD_SIZE", 1))
    a = launcher["parse_args"](train_args)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    settings = ppo_settings(a, n_proc, device)
    measured = peak_tensor_bytes(lambda: launcher["main"](train_args))
    model = ppo_memory(**settings)
    line = {"rank": int(os.environ.get("RANK", 0)), "measured": measured, "modelled": model["peak"],
            "ratio": model["peak"] / measured, "rollout_peak": model["rollout_peak"],
            "update_peak": model["update_peak"], "checkpoint_peak": model["checkpoint_peak"], "settings": settings}
    print("ppo_memory_check " + json.dumps(line), flush=True)
    return line


def gpu_check(out, quick=False):
    """One command for the GPU path (docs/scale.md): the tests that need CUDA, 2 PPO iterations of the world under
    bf16 autocast with the first iteration's KL (0 exactly when the reference computes through the policy's casts),
    prefill and decode tokens/s, the RM step's bf16 MFU, best-of-4 against one sample, and PPO's measured peak
    memory against the memory model; at InternLM2-7B's shapes for inference, a smaller model for training. Without
    CUDA it runs the same code at the quick sizes and says what it skipped. Writes one JSON to `out`."""
    import subprocess
    import tempfile
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    report = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
              "matmul_gflops_fp32": round(matmul_flops(2048 if cuda else 512, dev, torch.float32, 3) / 1e9, 1),
              "skipped": []}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"], cwd=ROOT,
                       capture_output=True, text=True)
    report["cuda_tests"] = {"exit_code": r.returncode, "summary": r.stdout.strip().splitlines()[-1:]}
    if not cuda:
        report["skipped"].append("the CUDA tests (tests/test_cuda.py skips them without a GPU)")
    with tempfile.TemporaryDirectory() as tmp:
        launch = ["--world-dir", str(Path(tmp) / "world"), "--init", str(WORLD_SFT), "--batch", "8",
                  "--save-every", "100"]
        subprocess.run([sys.executable, "train.py", "--stage", "rm", "--steps", "2", "--out", f"{tmp}/rm", *launch],
                       cwd=ROOT, check=True, capture_output=True)
        # one mini-batch and epoch: the first iteration's logged ratio is the rollout policy's own, 1 exactly; the
        # world's prompts as a --data file: no held-out evaluation, which the memory model leaves out
        ppo_args = ["--stage", "ppo", "--rm", f"{tmp}/rm", "--steps", "2", "--autocast", "bf16", "--data",
                    f"{tmp}/world/sft_train.json", "--max-new-tokens", "16", "--mini-batches", "1", "--ppo-epochs",
                    "1", "--out", f"{tmp}/ppo", *launch]
        r = subprocess.run([sys.executable, "bench.py", "--ppo-memory-check", *ppo_args], cwd=ROOT,
                           capture_output=True, text=True)
        lines = [json.loads(x.split(" ", 1)[1]) for x in r.stdout.splitlines() if x.startswith("ppo_memory_check ")]
        iters = [json.loads(x) for x in (Path(tmp) / "ppo" / "metrics.jsonl").read_text().splitlines()] \
            if r.returncode == 0 else []
        report["ppo_bf16"] = {"exit_code": r.returncode, "kl_iteration_0": iters[0]["kl"] if iters else None,
                              "ratio_iteration_0": iters[0]["ratio"] if iters else None,
                              "memory_modelled_over_measured": lines[0]["ratio"] if lines else None,
                              "error": r.stderr[-2000:] if r.returncode else None}
    s = GPU if cuda and not quick else QUICK
    train = dict(s, decoder=GPU_TRAIN) if cuda and not quick else s
    for name, fn, sizes in (("prefill", bench_prefill, s), ("decode", bench_decode, s), ("bon", bench_bon, s),
                            ("rm_train", bench_rm_train, train)):
        try:
            result, note = fn(sizes, dev, torch.bfloat16 if cuda else torch.float32)
        except Exception as e:  # one broken measurement must not hide the others
            result, note = {}, f"failed: {type(e).__name__}: {e}"
        report[name] = {**result, "note": note}
        if note.startswith("skipped"):
            report["skipped"].append(f"{name}: {note}")
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if not cuda:
        report["skipped"].append("sizes: the quick ones (InternLM2-7B's shapes need a GPU); bf16 MFU: CUDA only")
    report["seconds"] = round(time.time() - t0, 1)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------------------------------------------

MEASUREMENTS = {"prefill_vs_hf": bench_prefill, "prefill_plora_vs_hf": bench_prefill, "vision_vs_hf": bench_vision,
                "decode_ms_per_token": bench_decode, "decode_flatness": bench_decode, "bon_cost": bench_bon,
                "rm_train_mfu": bench_rm_train, "rm_shared_prefix_speedup": bench_rm_shared_prefix,
                "padding_waste": bench_padding, "logprob_peak_ratio": bench_logprobs, "load_rss_ratio": bench_load,
                "load_vs_read": bench_load}


def fmt(v):
    if isinstance(v, dict):
        return " ".join(f"{k}:{fmt(x)}" for k, x in v.items())
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def verdict(key, v):
    t = TARGETS[key]
    if t is None:
        return "", ""
    x = v[t[2]] if len(t) > 2 else v
    ok = x >= t[1] if t[0] == ">=" else x <= t[1]
    return f"{t[0]} {t[1]}" + (f" ({t[2]})" if len(t) > 2 else ""), "ok" if ok else "MISS"


def scoring_ranks(clean_args, repeats, threads=None):
    """`clean.py CLEAN_ARGS` as 1 process (torch's threads; left out with --threads 1), 1 process of 1 thread and 2
    torchrun processes of 1 thread each, interleaved `repeats` times so that background load hits them alike
    (docs/scale.md, scoring at scale). Medians of the whole command's wall time (process start included) and of the
    time clean.py states in its summary (from its start: reading, model load, scoring, outputs), rows per second of
    each, ratios against the first configuration; the load average and the summaries' matmul GFLOP/s beside them."""
    two = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    configs = {"1 process": ([], {}), "1 process, 1 thread": ([], {"OMP_NUM_THREADS": "1"}),
               "2 processes": (two, {"OMP_NUM_THREADS": "1"})}
    if threads == 1:
        del configs["1 process"]
    walls, inside, gflops = ({k: [] for k in configs} for _ in range(3))
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, (launcher, env) in configs.items():
                out = Path(tmp) / f"{r}-{name.replace(' ', '_').replace(',', '')}"
                t = time.perf_counter()
                subprocess.run([sys.executable, *launcher, "clean.py", *clean_args, "--out", str(out)], cwd=ROOT,
                               env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                walls[name].append(time.perf_counter() - t)
                summary = json.loads((out / "summary.json").read_text())
                rows = summary["samples"]
                inside[name].append(summary["seconds"])
                gflops[name].append(summary["matmul_gflops"])
                load.append(os.getloadavg()[0])
                print(f"  {name}: {walls[name][-1]:.1f} s ({summary['seconds']} s in clean.py)", file=sys.stderr,
                      flush=True)
    first = next(iter(configs))
    ref_wall, ref_in = statistics.median(walls[first]), statistics.median(inside[first])
    print(f"clean.py on {rows} rows, {repeats} runs each (interleaved); load average {min(load):.1f}-{max(load):.1f}")
    results = {}
    for name in configs:
        w, t = statistics.median(walls[name]), statistics.median(inside[name])
        results[name] = {"wall_s": [round(x, 1) for x in walls[name]], "clean_py_s": inside[name],
                         "rows_per_s_wall": round(rows / w, 1), "rows_per_s_in_clean_py": round(rows / t, 1),
                         "speedup_wall": round(ref_wall / w, 2), "speedup_in_clean_py": round(ref_in / t, 2),
                         "matmul_gflops": gflops[name]}
        print(f"  {name:20} wall {w:7.1f} s {rows / w:6.1f} rows/s {ref_wall / w:5.2f}x | in clean.py {t:7.1f} s "
              f"{rows / t:6.1f} rows/s {ref_in / t:5.2f}x | matmul GFLOP/s {gflops[name]}")
    return results


def main(argv=None):
    global PROFILE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shrink every size for a fast smoke run")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("--only", nargs="+", choices=list(MEASUREMENTS), metavar="KEY",
                   help=f"measure only these keys: {', '.join(MEASUREMENTS)}")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="print the top ops of each timed callable")
    p.add_argument("--rollout-fsdp", action="store_true", help="under torchrun: sampling from an FSDP-sharded policy "
                   "through a whole copy vs per-layer all-gathers at every step (README: PPO at 7B)")
    p.add_argument("--ppo-memory", nargs="?", const="7b", metavar="CONFIG", help="print the PPO memory model "
                   "per GPU for a config.json (default: IXC-2.5 7B) on 8 GPUs (README: PPO at 7B)")
    p.add_argument("--ppo-memory-check", nargs=argparse.REMAINDER, metavar="TRAIN_ARGS", help="run train.py with "
                   "these arguments (--stage ppo ...; under torchrun on every rank) and print its measured peak "
                   "tensor memory next to the model's; on GPUs: the check of the 7B table")
    p.add_argument("--gpu-check", metavar="FILE", help="the GPU path in one command (docs/scale.md): CUDA tests, "
                   "bf16 PPO, prefill/decode, RM MFU, best-of-4, memory; writes FILE (without CUDA: small, and says "
                   "what it skipped)")
    p.add_argument("--scoring-ranks", nargs=argparse.REMAINDER, metavar="CLEAN_ARGS", help="time clean.py with "
                   "these arguments (--rm ... --data ...; not --out) on 1 process and on 2 under torchrun, --repeats "
                   "times interleaved; --threads 1 leaves out 1 process with torch's threads (docs/scale.md)")
    p.add_argument("--repeats", type=int, default=2, help="--scoring-ranks: runs of each configuration")
    p.add_argument("--peers", nargs="*", metavar="KEY", help="instead: our loops against TRL's trainers and "
                   "transformers' generate on the same weights, at two sizes (peers.py; needs trl); KEYs pick rows")
    p.add_argument("--load-child", help=argparse.SUPPRESS)  # internal: the fresh process of load_rss_ratio
    a = p.parse_args(argv)
    if a.load_child:
        return load_child(a.load_child)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.gpu_check:
        return gpu_check(a.gpu_check, a.quick)
    if a.peers is not None:
        import peers
        results = peers.run(a.quick, a.peers or None)
        if a.json:
            data.atomic_write_text(Path(a.json), json.dumps(results, indent=2) + "\n")
        return results
    if a.ppo_memory:
        return print_ppo_memory(None if a.ppo_memory == "7b" else a.ppo_memory)
    if a.ppo_memory_check is not None:
        return check_ppo_memory(a.ppo_memory_check)
    if a.scoring_ranks is not None:
        results = scoring_ranks(a.scoring_ranks, a.repeats, a.threads)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
        return results
    if a.rollout_fsdp:
        import common
        rank, n_proc, dev = common.setup_distributed()
        results = rollout_fsdp(a.quick, dev)
        if a.json and rank == 0:
            Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
        common.teardown_distributed(n_proc)
        return results
    PROFILE, s = a.profile, QUICK if a.quick else FULL
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # inference comparisons; RM training runs fp32
    fns = list(dict.fromkeys(MEASUREMENTS[k] for k in (a.only or MEASUREMENTS)))
    print(f"bench on {dev} ({torch.get_num_threads()} threads), {'quick' if a.quick else 'full'} sizes, "
          f"torch {torch.__version__}", flush=True)
    results, notes, seconds, shown = {}, {}, {}, {}
    for fn in fns:
        name, t0 = fn.__name__.removeprefix("bench_"), time.perf_counter()
        torch.manual_seed(0)
        try:
            out, note = fn(s, dev, dt)
        except Exception as e:  # one broken measurement must not hide the others
            traceback.print_exc()
            out, note = {}, f"failed: {type(e).__name__}: {e}"
        seconds[name] = round(time.perf_counter() - t0, 1)
        results.update(out)
        notes[name], shown[name] = note, [k for k in out if k in TARGETS]
        print(f"  {name}: {seconds[name]} s", file=sys.stderr, flush=True)
        gc.collect()
    print(f"\n{'key':20} {'value':26} {'target':14} {'':4} detail")
    for name, keys in shown.items():
        if not keys:  # skipped or failed
            print(f"{name:20} {'-':26} {'':14} {'':4} {notes[name]}")
        for i, k in enumerate(keys):
            target, ok = verdict(k, results[k])
            print(f"{k:20} {fmt(results[k]):26} {target:14} {ok:4} {notes[name] if i == 0 else ''}".rstrip())
    print(f"total {sum(seconds.values()):.0f} s")
    if a.json:
        meta = {"device": str(dev), "dtype": str(dt), "quick": a.quick, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "seconds": seconds, "notes": notes}
        Path(a.json).write_text(json.dumps({**results, "meta": meta}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
