"""bench.py --peers at its --quick size: every row runs both sides on the same weights and its cross-checks hold (the
full benchmark, minutes long, is not a test). The TRL rows skip without trl (requirements-test.txt pins it)."""
import json
import math

import pytest

import bench
import peers

tf = pytest.importorskip("transformers")


def check_row(r, unit):
    for s in ("ours", "theirs"):
        assert r[s][f"{unit}_per_s"] > 0 and math.isfinite(r[s][f"{unit}_per_s"])
        assert 0 < r[s]["mfu"] < 1, f"{s}: MFU {r[s]['mfu']} is no fraction of the matmul peak"
    assert r["ratio"] == pytest.approx(r["ours"][f"{unit}_per_s"] / r["theirs"][f"{unit}_per_s"])


def test_generate_and_bon_rows_same_weights(tmp_path):
    """The twins hold our weights (the same prompt logits and reward scores), and the CLI writes the JSON."""
    out = tmp_path / "peers.json"
    bench.main(["--peers", "generate_vs_hf", "bon4_vs_hf", "--quick", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["matmul_gflops"] > 0
    gen, bon = r["generate_vs_hf"]["quick"], r["bon4_vs_hf"]["quick"]
    assert gen["prefill_logits_max_diff"] < 1e-4
    assert bon["score_max_diff"] < 1e-4
    check_row(gen, "tokens")
    check_row(bon, "prompts")


def test_unknown_row_is_named():
    with pytest.raises(SystemExit, match="no_such_row"):
        peers.run(quick=True, only=["no_such_row"])


def test_trl_rows():
    """The first step's Bradley-Terry loss is TRL's (same pairs, same weights), and both sides take the same number
    of optimizer steps in every row; the phases add up to no more than the iteration."""
    pytest.importorskip("trl")
    r = peers.run(quick=True, only=["rm_train_vs_trl", "rloo_vs_trl", "ppo_vs_trl"])
    rm = r["rm_train_vs_trl"]["quick"]
    assert rm["first_loss_diff"] < 1e-5 and rm["first_loss"] > 0
    check_row(rm, "pairs")
    for key in ("rm_train_vs_trl", "rloo_vs_trl", "ppo_vs_trl"):
        steps = r[key]["quick"]["optimizer_steps"]
        assert steps[0] == steps[1] > 0, f"{key}: optimizer steps {steps}"
    for key in ("rloo_vs_trl", "ppo_vs_trl"):
        row = r[key]["quick"]
        check_row(row, "prompts")
        for s in ("ours", "theirs"):
            ph = row[s]["phases"]
            assert min(ph.values()) >= 0 and ph["generation"] > 0
            assert sum(ph.values()) <= max(row[s]["seconds"]) * 1.05 + 0.01, (s, ph, row[s]["seconds"])
