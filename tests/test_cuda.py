"""The GPU path (batching.py, model.py on CUDA): these skip without a CUDA GPU, saying so; `python bench.py
--gpu-check FILE` runs them on one (docs/scale.md)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import batching
from model import Config, InternLM2Model, InternLMXComposer2, init_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (python bench.py --gpu-check FILE runs these on one)")
CUDA = torch.device("cuda")
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             plora_rank=8, vocab_size=1000)


def test_a_batch_without_padding_takes_the_flash_kernel():
    """attention_mask=None (what ppo.model_batch passes when no row is padded): SDPA's FlashAttention kernel runs
    (sdpa_kernel allows only it: a masked call would fail), and gives the masked kernel's numbers."""
    model = init_weights(InternLM2Model(Config(**SMALL))).to(CUDA, torch.bfloat16).eval()
    x = torch.randn(2, 128, SMALL["hidden_size"], device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = model(x)
        masked = model(x, attention_mask=torch.ones(2, 128, dtype=torch.long, device=CUDA))
    torch.testing.assert_close(flash, masked, rtol=2e-2, atol=2e-2)


def test_chunked_logprobs_bound_the_device_memory():
    """token_logprobs on the GPU: the peak allocated over its forward and backward stays a fraction of the whole
    [B, T, V] fp32 log-softmax's bytes."""
    B, T, D, V = 4, 512, 256, 92544
    head = torch.nn.Linear(D, V, bias=False, device=CUDA)
    h = torch.randn(B, T, D, device=CUDA, requires_grad=True)
    targets = torch.randint(V, (B, T), device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, _ = batching.token_logprobs(head, h, targets, 1.0, chunk=256)
    logp.sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < B * T * V * 4 / 4


def test_pinned_copies_arrive_whole():
    t = torch.arange(1 << 20)
    on = batching.to_device(t, CUDA)
    assert on.device.type == "cuda" and torch.equal(on.cpu(), t)
    rows = batching.ids_to_device([[1, 2, 3], [4], [5, 6]], CUDA)
    assert [r.tolist() for r in rows] == [[1, 2, 3], [4], [5, 6]]


def test_generation_on_the_gpu_drops_ended_rows_without_changing_a_token(monkeypatch):
    """Per-row generators on the device: dropping ended rows gives the tokens of decoding every row to the end."""
    import model as model_module
    from data import Tokenizer
    from world import WORLD_SFT
    policy = InternLMXComposer2.from_pretrained(WORLD_SFT, device=CUDA)
    policy.tokenizer = Tokenizer(WORLD_SFT / "tokenizer.model")
    batch = policy.embed_batch([policy.sequence(q, []) for q in ("Describe the image.", "What colour is it?")],
                               left_pad=True)
    outs = []
    for drop in (model_module.DROP_ENDED, 2.0):
        monkeypatch.setattr(model_module, "DROP_ENDED", drop)
        gens = [torch.Generator(CUDA).manual_seed(i) for i in range(8)]
        outs.append(policy.generate(batch["embeds"], batch["im_mask"], batch["attention_mask"], 24, 1.0,
                                    stop_ids=list(range(0, 600, 7)), generator=gens, n=4))
    assert torch.equal(outs[0], outs[1])
