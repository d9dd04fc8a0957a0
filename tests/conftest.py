"""Shared test helpers: where ../shared is, tiny random checkpoints in the official layout, and one comparison with
a tolerance that scales with the reference, so that fp32 rounding noise passes on every CPU and thread count."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("IXC_SHARED", ROOT.parent / "shared"))
GOLDEN, ASSETS = SHARED / "golden", SHARED / "assets"
REAL_TOKENIZER = ASSETS / "internlm2" / "tokenizer.model"

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
# Two float32 computations of the same function (another implementation, kernel, batch shape or thread count) differ
# by rounding, relative to the size of what they compute: about EPS32 * sqrt(K) per layer for reductions of K terms
# (K up to 1601: attention over a 40x40 grid + CLS, 5e-6), twice for our 2-layer models: RTOL32 = 1e-5 (84 EPS32).
# Observed at most 1.2e-6 relative (OMP 1 and 2); each wrong detail tried in the README's Tests fails by 2x or more.
RTOL32 = 1e-5
# A score w.h can cancel toward 0 (0.011 in a golden case) while its rounding follows its terms: sum |w_i h_i| is
# 4-5 for a head of std 1/sqrt(hidden) on normed hidden states, so scores get an atol of RTOL32 times 5.
SCORE_ATOL = 5 * RTOL32


@pytest.fixture(scope="session", autouse=True)
def deterministic():
    """Deterministic kernels wherever torch has a choice (and NaN-filled torch.empty, so reading uninitialised
    memory cannot pass by luck); warn_only for an op without a deterministic CPU path."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def assert_close(out, ref, rtol, atol=0.0, what="output"):
    """max|out - ref| <= rtol * max|ref| + atol. Bounds scale with the reference's magnitude: rounding noise of a
    float32 computation is relative (a few EPS32 times the reduction's length and depth), so a bound in units of
    max|ref| holds on any CPU, BLAS and thread count, where a fixed atol holds only for outputs of the size it was
    tuned on. atol is for values that can cancel to ~0 while their terms do not (a score is a dot product).
    Shapes must agree and nothing may be NaN or inf. With IXC_TOL_LOG=file each comparison appends its numbers."""
    out, ref = (torch.as_tensor(t).detach().double() for t in (out, ref))
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all() and torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    bound = rtol * scale + atol
    if os.environ.get("IXC_TOL_LOG"):
        with open(os.environ["IXC_TOL_LOG"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").removesuffix(" (call)"),
                                "what": what, "err": err, "scale": scale, "bound": bound}) + "\n")
    assert err <= bound, (f"{what}: max|out - ref| {err:.3g} > bound {bound:.3g} (rtol {rtol:g} x max|ref| "
                          f"{scale:.3g} + atol {atol:g}); relative {err / max(scale, 1e-30):.3g}")


needs_shared = pytest.mark.skipif(not GOLDEN.is_dir() or not ASSETS.is_dir(),
                                  reason=f"{SHARED} not found: the official reference outputs and assets live there "
                                         "(set IXC_SHARED to point elsewhere)")

TINY = dict(vocab_size=92544, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0},
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=56, patch_size=14))


def randomize(model, seed=0):
    """Every parameter drawn at random (nothing zero or one), so a wrong wiring cannot hide behind a trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 if p.dim() < 2 or "embeddings" in name or "GN" in name else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return model
