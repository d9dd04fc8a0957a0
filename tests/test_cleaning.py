"""Cleaning that pays: the arms' rows (world/cleaning.py), and clean.py -> kept.json -> train.py --stage sft."""
import json
import random

import pytest

import clean
import train
from conftest import randomize
from reward import RewardModel
from test_train import world  # noqa: F401  (the small-world fixture)
from world import cleaning


def test_oracle_and_random_arms_select_exactly_their_rows(world, tmp_path):  # noqa: F811
    wd = world / "world"
    rows, errors = (json.loads((wd / f).read_text()) for f in ("sft_train.json", "sft_errors.json"))
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps(rows[:40]))   # a cleaner that kept 40 rows
    counts = cleaning.write_arms(wd / "sft_train.json", wd / "sft_errors.json", kept, tmp_path / "arms", seed=3)
    oracle = json.loads((tmp_path / "arms" / "oracle" / "kept.json").read_text())
    bad = {e["id"] for e in errors}
    assert [r["id"] for r in oracle] == [r["id"] for r in rows if r["id"] not in bad] and 0 < len(oracle) < len(rows)
    assert counts == {"oracle": len(oracle), "random": 40}
    rand = json.loads((tmp_path / "arms" / "random" / "kept.json").read_text())
    drop = set(random.Random(3).sample(range(len(rows)), len(rows) - 40))   # the draw, by hand
    assert [r["id"] for r in rand] == [r["id"] for i, r in enumerate(rows) if i not in drop]
    again = cleaning.random_rows(rows, len(rows) - 40, 3)
    assert again == [r for i, r in enumerate(rows) if i not in drop] != cleaning.random_rows(rows, len(rows) - 40, 4)
    # image paths resolve from each arm's directory to the world's own files
    one = next(r for r in rand if "image" in r)
    assert (tmp_path / "arms" / "random" / one["image"][0]).resolve() == (wd / rows[[r["id"] for r in rows].index(
        one["id"])]["image"][0]).resolve()


def test_compare_reports_mean_spread_and_prompts(world):  # noqa: F811
    prompts = json.loads((world / "world" / "heldout_prompts.json").read_text())
    fam = {"perception": 0.5, "text": 1.0, "followup": 0.25}
    runs = {"b": [{"heldout_instruction_following": x, "heldout_followup_right": 0.5, "heldout_right": 0.6,
                   "heldout_accuracy": 0.6, "heldout_accuracy_by_family": fam} for x in (0.8, 0.9, 1.0)]}
    row = cleaning.compare(runs, prompts)["b"]
    assert row["instruction following"] == pytest.approx((0.9, 0.1, 3))
    n = sum(cleaning.content_family(p) == "perception" for p in prompts)
    m, sd, seeds, count, se = row["content: perception"]
    assert (m, sd, seeds, count) == (0.5, 0.0, 3, n) and se == pytest.approx((0.25 / n) ** 0.5)


def test_clean_kept_file_trains_with_sft_unchanged(world, tmp_path):  # noqa: F811
    """clean.py on the world's SFT set with its labels, then train.py --stage sft --data on the kept rows."""
    rm_dir = tmp_path / "rm"
    randomize(RewardModel.from_pretrained(world / "sft", head="score"), seed=2).save_pretrained(rm_dir)
    wd = world / "world"
    s = clean.main(["--rm", str(rm_dir), "--data", str(wd / "sft_train.json"), "--labels", str(wd / "sft_errors.json"),
                    "--flag-fraction", "0.3", "--out", str(tmp_path / "c")])
    kept = json.loads((tmp_path / "c" / "kept.json").read_text())
    assert len(kept) == s["rows"] - s["flagged"] and 0.0 <= s["auroc_by_family"]["instruction"] <= 1.0
    out = train.main(["--stage", "sft", "--init", str(world / "sft"), "--data", str(tmp_path / "c" / "kept.json"),
                      "--heldout", str(wd / "heldout_prompts.json"), "--steps", "2", "--batch", "4",
                      "--out", str(tmp_path / "sft")])
    assert out["steps"] == 2 and "heldout_instruction_following" in out
