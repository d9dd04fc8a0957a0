"""Our hand-written modules equal trusted reference implementations (transformers' CLIPVisionModel, LlamaModel)
with the same random weights, float32 on CPU, small sizes (minGPT-style evidence), to a tolerance relative to the
reference's magnitude (conftest.assert_close)."""
import pytest
import torch

from conftest import RTOL32, TINY, assert_close, randomize
from model import Config, InternLM2Model, KVCache, PLoRA
from vision import CLIPVisionTower, VisionConfig

transformers = pytest.importorskip("transformers")


def close(a, b, what="output"):
    assert_close(a, b, rtol=RTOL32, what=what)


# ----------------------------------------------------------------------------------------------------------------
# CLIP ViT vs transformers.CLIPVisionModel


@pytest.mark.parametrize("vc, n", [(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=56, patch_size=14), 3),
                                   (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=560, patch_size=14), 1)])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_clip_vision_tower_matches_hf(vc, n, impl):
    """CLIPVisionTower == HF CLIPVisionModel last_hidden_state (before post_layernorm) minus CLS, incl. the 40x40 grid."""
    vc = dict(vc, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    hcfg = transformers.CLIPVisionConfig(**vc, attn_implementation=impl)
    hf = randomize(transformers.CLIPVisionModel(hcfg), seed=1).eval()
    assert hf.config._attn_implementation == impl
    ours = CLIPVisionTower(VisionConfig(**vc)).eval()
    # transformers 4.x nests everything under `vision_model.`; 5.x flattens CLIPVisionModel
    state = {"vision_tower.vision_model." + k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()
             if "post_layernorm" not in k and "position_ids" not in k}
    ours.load_state_dict(state, strict=True)
    pixels = torch.randn(n, 3, vc["image_size"], vc["image_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state[:, 1:]
        out = ours(pixels)
    grid = vc["image_size"] // vc["patch_size"]
    assert out.shape == (n, grid * grid, vc["hidden_size"])
    close(out, ref)


# ----------------------------------------------------------------------------------------------------------------
# InternLM2 decoder (no PLoRA) vs transformers.LlamaModel


def pair(n_kv, impl, seed=0, rope_scaling=None):
    """Our rank-0 InternLM2Model with random weights and a LlamaModel holding the same weights (wqkv unpacked)."""
    cfg = Config(**{**TINY, "num_key_value_heads": n_kv, "vocab_size": 128, "plora_rank": 0,
                    "rope_scaling": rope_scaling})
    ours = randomize(InternLM2Model(cfg), seed).eval()
    hcfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                    intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                                    num_attention_heads=cfg.num_attention_heads, num_key_value_heads=n_kv,
                                    rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, attention_bias=False,
                                    mlp_bias=False, max_position_embeddings=4096, attn_implementation=impl,
                                    rope_scaling=rope_scaling and {"rope_type": rope_scaling["type"],
                                                                   "factor": rope_scaling["factor"]})
    hf = transformers.LlamaModel(hcfg).eval()
    assert hf.config._attn_implementation == impl
    g, hd, D = cfg.num_attention_heads // n_kv, cfg.head_dim, cfg.hidden_size
    sd = {"embed_tokens.weight": ours.tok_embeddings.weight, "norm.weight": ours.norm.weight}
    for i, layer in enumerate(ours.layers):
        p = f"layers.{i}."
        wqkv = layer.attention.wqkv.weight.view(n_kv, g + 2, hd, D)  # [kv group][g queries, key, value][head_dim]
        sd[p + "self_attn.q_proj.weight"] = wqkv[:, :g].reshape(-1, D)
        sd[p + "self_attn.k_proj.weight"] = wqkv[:, g].reshape(-1, D)
        sd[p + "self_attn.v_proj.weight"] = wqkv[:, g + 1].reshape(-1, D)
        sd[p + "self_attn.o_proj.weight"] = layer.attention.wo.weight
        sd[p + "mlp.gate_proj.weight"] = layer.feed_forward.w1.weight
        sd[p + "mlp.up_proj.weight"] = layer.feed_forward.w3.weight
        sd[p + "mlp.down_proj.weight"] = layer.feed_forward.w2.weight
        sd[p + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return cfg, ours, hf


def padded_batch(cfg, L=11, seed=3):
    """Embeds [3, L, D] and a mask: row 0 unpadded, row 1 right-padded by 3, row 2 left-padded by 4."""
    embeds = torch.randn(3, L, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, L, dtype=torch.long)
    mask[1, -3:], mask[2, :4] = 0, 0
    return embeds, mask, (mask.cumsum(1) - 1).clamp(min=0)


GQA = pytest.mark.parametrize("n_kv", [2, 1])  # 4 query heads on 2 KV heads (TINY) and 4:1
IMPL = pytest.mark.parametrize("impl", ["eager", "sdpa"])


@GQA
@IMPL
def test_decoder_matches_llama(n_kv, impl):
    """Unpadded forward: our final-normed hidden states == LlamaModel(inputs_embeds).last_hidden_state, for inputs of
    std 1 and of std 1e-2, where RMSNorm's eps (1e-5 against a mean square of 1e-4) is no longer negligible."""
    cfg, ours, hf = pair(n_kv, impl)
    embeds = torch.randn(2, 13, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for std in (1.0, 1e-2):
            close(ours(embeds * std), hf(inputs_embeds=embeds * std).last_hidden_state, what=f"inputs of std {std:g}")


def test_linear_rope_scaling_matches_llama():
    """InternLM2 also allows {"type": "linear"}: positions divided by the factor (IXC-2.5 itself uses dynamic)."""
    cfg, ours, hf = pair(2, "sdpa", rope_scaling={"type": "linear", "factor": 3.0})
    embeds = torch.randn(2, 13, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, ref = ours(embeds), hf(inputs_embeds=embeds).last_hidden_state
        unscaled = pair(2, "sdpa")[1](embeds)
    close(out, ref)
    assert (out - unscaled).abs().max() > 1e-2  # the scaling is not a no-op at these positions


@GQA
@IMPL
def test_decoder_padding_matches_llama(n_kv, impl):
    """Right and left padding (attention_mask + cumsum position_ids) == LlamaModel at every real position."""
    cfg, ours, hf = pair(n_kv, impl)
    embeds, mask, pos = padded_batch(cfg)
    with torch.no_grad():
        out = ours(embeds, attention_mask=mask, position_ids=pos)
        ref = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    real = mask.bool()
    close(out[real], ref[real])


@GQA
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_decoding_matches_llama_full_forward(n_kv, padded):
    """KVCache: prefill 5, a chunk of 2, then one token at a time == one full LlamaModel forward (real positions)."""
    cfg, ours, hf = pair(n_kv, "sdpa")
    embeds, _, _ = padded_batch(cfg)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    if padded:  # as in generate(): prompts left-padded (rows 1, 2 by 3 and 4), decoded tokens always real
        mask[1, :3], mask[2, :4] = 0, 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    L = embeds.shape[1]
    cache = KVCache(cfg, 3, L, torch.float32, "cpu")
    chunks = [(0, 5), (5, 7)] + [(t, t + 1) for t in range(7, L)]
    with torch.no_grad():
        out = torch.cat([ours(embeds[:, a:b], attention_mask=mask[:, a:b], position_ids=pos[:, a:b], cache=cache)
                         for a, b in chunks], dim=1)
        ref = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    assert cache.len == L
    real = mask.bool()
    close(out[real], ref[real])


# ----------------------------------------------------------------------------------------------------------------
# PLoRA


@pytest.mark.parametrize("bias", [False, True])
def test_plora_linear_matches_naive_per_token_loop(bias):
    """PLoRA.forward == W x (+ b) + B(A x) on im_mask tokens and == W x (+ b) elsewhere, token by token."""
    lin = randomize(PLoRA(24, 40, rank=8, bias=bias), seed=5).eval()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 24, generator=gen)
    im_mask = torch.rand(2, 9, generator=gen) < 0.5
    im_mask[0, 0], im_mask[0, 1] = True, False
    W, b = lin.weight, lin.bias if bias else torch.zeros(40)
    A, B = lin.Plora_A.weight, lin.Plora_B.weight
    with torch.no_grad():
        out, plain = lin(x, im_mask), lin(x)
        ref = torch.stack([torch.stack([W @ x[i, t] + b + (B @ (A @ x[i, t]) if im_mask[i, t] else 0)
                                        for t in range(9)]) for i in range(2)])
        close(out, ref)
        close(plain, x @ W.T + b)  # no im_mask: the LoRA never acts
        assert (out - plain)[im_mask].abs().min() > 0  # and it really acts on image tokens


def test_decoder_without_image_tokens_equals_rank0():
    """InternLM2Model with PLoRA and im_mask all False (or None) == the same weights with plora_rank 0."""
    cfg = Config(**{**TINY, "vocab_size": 128, "plora_rank": 8})
    with_lora = randomize(InternLM2Model(cfg), seed=7).eval()
    plain = InternLM2Model(Config(**{**TINY, "vocab_size": 128, "plora_rank": 0})).eval()
    missing, unexpected = plain.load_state_dict(with_lora.state_dict(), strict=False)
    assert not missing and unexpected and all("Plora_" in k for k in unexpected)
    embeds = torch.randn(2, 10, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    im_mask = torch.zeros(2, 10, dtype=torch.bool)
    with torch.no_grad():
        ref = plain(embeds)
        close(with_lora(embeds, im_mask=im_mask), ref)
        close(with_lora(embeds), ref)
        im_mask[:, 2:6] = True
        assert (with_lora(embeds, im_mask=im_mask) - ref).abs().max() > 1e-3  # image tokens do change the output
