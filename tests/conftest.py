"""Shared test helpers: where ../shared is, and tiny random checkpoints in the official layout."""
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
