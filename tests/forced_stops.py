"""torchrun entry of test_ppo_fsdp_ranks_stopping_apart: train.py with each sampled token forced by rank. Rank 0's
responses all stop at their first token, rank 1's never stop (a stop token it draws is replaced), so they run to
--max-new-tokens. Everything else is train.py's own path; greedy decoding (the held-out evaluation) is left alone.

    python -m torch.distributed.run --nproc_per_node 2 tests/forced_stops.py --stage ppo --fsdp --world-dir W ...

A test cannot monkeypatch the processes torchrun starts, so this file is their entry point and patches itself.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

RANK = int(os.environ["RANK"])
TOK = data.Tokenizer(Path(sys.argv[sys.argv.index("--world-dir") + 1]) / "tokenizer.model")
STOPS = torch.tensor([TOK.eos_id, TOK.eot_id])
OTHER = TOK.encode("the", add_special_tokens=False)[0]
sample_token = model.sample_token


def forced(logits, temperature=0.0, top_p=1.0, generator=None):
    tok = sample_token(logits, temperature, top_p, generator)  # drawn all the same: the generators advance as usual
    if temperature <= 0:
        return tok
    return torch.full_like(tok, TOK.eot_id) if RANK == 0 else torch.where(torch.isin(tok, STOPS), OTHER, tok)


model.sample_token = forced
if __name__ == "__main__":
    data.run_cli(train.main)
