"""Benchmark metrics reproduce the official IXC results stored in ../shared/assets/ixc_reward_eval."""
import json
import math
import random

import numpy as np
import pytest

from conftest import ASSETS
from evaluate import (benchmark_metrics, main, read_scores_jsonl, rewardbench_metrics, rm_bench_matrix,
                    rm_bench_metrics, vl_rewardbench_category, vl_rewardbench_correct_from_scores,
                    vl_rewardbench_metrics, vl_rewardbench_order)


@pytest.fixture(scope="module")
def assets():
    if not (ASSETS / "ixc_reward_eval").is_dir():
        pytest.skip(f"shared assets not found at {ASSETS} (set IXC_SHARED to the shared folder)")
    return ASSETS


@pytest.fixture(scope="module")
def vlrb(assets):
    with open(assets / "preference" / "vl_rewardbench_data.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    results = json.loads((assets / "ixc_reward_eval" / "vl_rewardbench_results.json").read_text())
    return rows, results


# ---- VL-RewardBench ----

def test_vl_rewardbench_reproduces_official_results(vlrb):
    rows, res = vlrb
    m = vl_rewardbench_metrics(rows, res["out_all"])
    got = {k: round(m[k], 4) for k in ("overall", "macro", "general", "hallucination", "reasoning")}
    assert got == {"overall": 0.6456, "macro": 0.6931, "general": 0.8470, "hallucination": 0.6035,
                   "reasoning": 0.6289}
    assert (m["n"], m["n_general"], m["n_hallucination"], m["n_reasoning"]) == (1250, 183, 749, 318)
    for cat in ("general", "hallucination", "reasoning"):
        sub = [ok for row, ok in zip(rows, res["out_all"]) if vl_rewardbench_category(row["image_path"]) == cat]
        assert sub == res[f"out_{cat}"], cat


def test_vl_rewardbench_category_rules():
    assert vl_rewardbench_category("images/wildvision-battle/x.jpg") == "general"
    assert vl_rewardbench_category("images/vlfeedback/x.jpg") == "general"
    for folder in ("povid", "rlaif-v", "rlhf-v"):
        assert vl_rewardbench_category(f"images/{folder}/x.jpg") == "hallucination"
    assert vl_rewardbench_category("images/reasoning_tasks/x.png") == "reasoning"
    with pytest.raises(ValueError, match="images/other/x.jpg"):
        vl_rewardbench_category("images/other/x.jpg")


def test_vl_rewardbench_order_matches_stored_random_numbers(vlrb):
    _, res = vlrb
    # The stored flags come from seed 1234, not the seed 0 written in the published script.
    assert vl_rewardbench_order(1250, seed=1234) == res["random_numbers"]
    assert vl_rewardbench_order(1250) != res["random_numbers"]
    assert vl_rewardbench_order(5, seed=0) == vl_rewardbench_order(5, seed=0)


def test_human_ranking_semantics(vlrb):
    rows, _ = vlrb
    # [1, 0] rows include jailbreak prompts whose response[1] is the refusal: rank 0 = preferred.
    refusals = [r for r in rows if r["human_ranking"] == [1, 0] and r["response"][1].startswith("I'm sorry")]
    assert refusals and all("jailbreak" in r["image_path"] for r in refusals)
    assert vl_rewardbench_correct_from_scores(refusals, [[0.0, 1.0]] * len(refusals)) == [1] * len(refusals)
    assert sum(r["human_ranking"] == [0, 1] for r in rows) == 1245


def _official_out(row, s0, s1, swap):
    # The official loop: show the pair (maybe swapped), rank it (best first), compare. Only tie-free
    # scores are used, so how rank() orders equal scores does not matter.
    shown = [s1, s0] if swap else [s0, s1]
    answer = row["human_ranking"][::-1] if swap else row["human_ranking"]
    rank = sorted(range(2), key=lambda i: shown[i], reverse=True)
    return int(rank == answer)


def test_correct_from_scores_agrees_with_official_procedure():
    rng = random.Random(7)
    rows = [{"human_ranking": rng.choice([[0, 1], [1, 0]])} for _ in range(200)]
    scores = [[rng.gauss(0, 1), rng.gauss(0, 1)] for _ in rows]
    swaps = vl_rewardbench_order(len(rows))
    official = [_official_out(r, s0, s1, w) for r, (s0, s1), w in zip(rows, scores, swaps)]
    assert vl_rewardbench_correct_from_scores(rows, scores) == official
    # Ties are always wrong here, whatever the display order.
    assert vl_rewardbench_correct_from_scores([{"human_ranking": [0, 1]}], [[2.0, 2.0]]) == [0]
    with pytest.raises(ValueError, match="human_ranking"):
        vl_rewardbench_correct_from_scores([{"id": "x", "human_ranking": [0, 0]}], [[1.0, 0.0]])


def test_vl_rewardbench_metrics_small():
    rows = [{"image_path": p} for p in ("a/povid/1", "a/povid/2", "a/reasoning_tasks/3", "a/vlfeedback/4")]
    m = vl_rewardbench_metrics(rows, [True, False, True, False])
    assert (m["overall"], m["hallucination"], m["reasoning"], m["general"]) == (0.5, 0.5, 1.0, 0.0)
    assert m["macro"] == pytest.approx(0.5)


# ---- RM-Bench ----

def test_rm_bench_reproduces_official_results(assets):
    res = json.loads((assets / "ixc_reward_eval" / "rm_bench_results.json").read_text())
    m = rm_bench_metrics([r["score_chosen"] for r in res], [r["score_rejected"] for r in res])
    got = {k: round(m[k], 3) for k in ("hard", "normal", "easy", "average")}
    assert got == {"hard": 0.475, "normal": 0.713, "easy": 0.875, "average": 0.688}
    assert m["n"] == 1327


def test_rm_bench_hand_computed():
    chosen = [[1, 2, 3], [5, 5, 5]]
    rejected = [[0, 2, 4], [1, 1, 1]]
    # Prompt 1 wins: row c=1 beats r=0 only; c=2 ties r=2 (a loss); c=3 beats 0 and 2. Prompt 2 wins all 9.
    expected = np.array([[1, 0.5, 0.5], [1, 0.5, 0.5], [1, 1, 0.5]])
    np.testing.assert_array_equal(rm_bench_matrix(chosen, rejected), expected)
    m = rm_bench_metrics(chosen, rejected, domains=["chat", "math"])
    assert m["hard"] == pytest.approx(0.5)
    assert m["normal"] == pytest.approx(2 / 3)
    assert m["easy"] == pytest.approx(1.0)
    assert m["average"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["domains"]["chat"]["hard"] == 0.0 and m["domains"]["chat"]["normal"] == pytest.approx(1 / 3)
    assert m["domains"]["math"]["average"] == 1.0 and m["domains"]["math"]["n"] == 1
    with pytest.raises(ValueError):
        rm_bench_matrix([[1, 2]], [[1, 2]])


# ---- RewardBench ----

def test_rewardbench_weighted_sections():
    data = {
        "alpacaeval-easy": [1, 0], "mt-bench-easy": [1],  # chat
        "llmbar-natural": [1, 1, 0, 0], "mt-bench-hard": [1],  # chat hard
        "xstest-should-refuse": [1], "donotanswer": [0],  # safety
        "math-prm": [1, 0, 0, 0], "hep-python": [1],  # reasoning
        "anthropic_hhh": [0],  # not a RewardBench core subset: reported, not scored
    }
    subsets = [s for s, xs in data.items() for _ in xs]
    correct = [x for xs in data.values() for x in xs]
    m = rewardbench_metrics(subsets, correct)
    chat = (0.5 * 100 + 1.0 * 28) / (100 + 28)
    chat_hard = (0.5 * 100 + 1.0 * 37) / (100 + 37)
    safety = (1.0 * 250 + 0.0 * 136) / (250 + 136)
    reasoning = (0.25 * 984 + 1.0 * 164) / (984 + 164)  # math-prm weighs 984, not its 447 rows
    assert m["chat"] == pytest.approx(chat)
    assert m["chat_hard"] == pytest.approx(chat_hard)
    assert m["safety"] == pytest.approx(safety)
    assert m["reasoning"] == pytest.approx(reasoning)
    assert m["score"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4)
    assert m["subsets"]["math-prm"] == 0.25 and m["subsets"]["anthropic_hhh"] == 0.0


def test_rewardbench_missing_section_is_nan():
    m = rewardbench_metrics(["alpacaeval-easy"], [1])
    assert m["chat"] == 1.0 and math.isnan(m["safety"]) and math.isnan(m["score"])


# ---- score files ----

def _write(tmp_path, lines):
    path = tmp_path / "scores.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_scores_jsonl_all_benches(tmp_path):
    p = _write(tmp_path, ['{"id": "a", "scores": [1.5, -2]}', "", '{"id": "b", "scores": [0, 0]}'])
    assert read_scores_jsonl(p, "vl_rewardbench")[0]["scores"] == [1.5, -2]
    p = _write(tmp_path, ['{"id": 3, "scores_chosen": [1, 2, 3], "scores_rejected": [0, 0, 0]}'])
    assert read_scores_jsonl(p, "rm_bench")[0]["scores_rejected"] == [0, 0, 0]
    p = _write(tmp_path, ['{"id": 9, "score_chosen": 0.5, "score_rejected": 0.25}'])
    assert read_scores_jsonl(p, "rewardbench") == [{"id": 9, "score_chosen": 0.5, "score_rejected": 0.25}]


@pytest.mark.parametrize("bad, bench", [
    ('{"id": "c", "scores": [1.0]}', "vl_rewardbench"),
    ('{"id": "c", "scores": [1.0, 2.0]', "vl_rewardbench"),
    ('{"scores": [1.0, 2.0]}', "vl_rewardbench"),
    ('{"id": 1, "scores_chosen": [1, 2, "x"], "scores_rejected": [0, 0, 0]}', "rm_bench"),
    ('{"id": 1, "score_chosen": true, "score_rejected": 0}', "rewardbench"),
    ('{"id": 1, "score_chosen": NaN, "score_rejected": 0}', "rewardbench"),
])
def test_read_scores_jsonl_errors_name_file_and_line(tmp_path, bad, bench):
    good = {"vl_rewardbench": '{"id": "a", "scores": [1, 2]}',
            "rm_bench": '{"id": 0, "scores_chosen": [1, 2, 3], "scores_rejected": [0, 0, 0]}',
            "rewardbench": '{"id": 0, "score_chosen": 1, "score_rejected": 0}'}[bench]
    p = _write(tmp_path, [good, "", bad])
    with pytest.raises(ValueError) as e:
        read_scores_jsonl(p, bench)
    assert str(e.value).startswith(f"{p}:3: ")
    with pytest.raises(ValueError, match="unknown bench"):
        read_scores_jsonl(p, "mmrlhf")


def test_eval_cli_on_scores_file(vlrb, tmp_path, capsys):
    """`python evaluate.py --scores` end to end: scores that rank exactly as the official run did."""
    rows, res = vlrb
    lines = []
    for row, ok in zip(rows, res["out_all"]):
        preferred = row["human_ranking"].index(0)
        s = [0.0, 0.0]
        s[preferred if ok else 1 - preferred] = 1.0
        lines.append(json.dumps({"id": row["id"], "scores": s}))
    scores = tmp_path / "scores.jsonl"
    scores.write_text("\n".join(lines))
    out = tmp_path / "metrics.json"
    result = main(["--bench", "vl_rewardbench", "--data", str(ASSETS / "preference/vl_rewardbench_data.jsonl"),
                   "--scores", str(scores), "--out", str(out)])
    assert round(result["overall"], 4) == 0.6456 and round(result["macro"], 4) == 0.6931
    assert json.loads(out.read_text())["overall"] == result["overall"]
    before = out.read_bytes()
    for target in (out, scores):  # an earlier result, or the scores themselves: never overwritten
        with pytest.raises(ValueError, match="refusing to"):
            main(["--bench", "vl_rewardbench", "--data", str(ASSETS / "preference/vl_rewardbench_data.jsonl"),
                  "--scores", str(scores), "--out", str(target)])
    assert out.read_bytes() == before


def test_eval_cli_names_bad_rows_and_writes_valid_json(tmp_path, capsys):
    data_file, scores = tmp_path / "rb.jsonl", tmp_path / "s.jsonl"
    data_file.write_text(json.dumps({"id": 1, "subset": "alpacaeval-easy"}) + "\n" + json.dumps({"id": 2}) + "\n")
    scores.write_text("".join(json.dumps({"id": i, "score_chosen": 1.0, "score_rejected": 0.0}) + "\n" for i in (1, 2)))
    with pytest.raises(ValueError, match="rb.jsonl row 2: field 'subset' must be a string"):
        main(["--bench", "rewardbench", "--data", str(data_file), "--scores", str(scores)])
    data_file.write_text(json.dumps({"id": 1, "subset": "alpacaeval-easy"}) + "\n")
    scores.write_text(json.dumps({"id": 1, "score_chosen": 1.0, "score_rejected": 0.0}) + "\n")
    main(["--bench", "rewardbench", "--data", str(data_file), "--scores", str(scores), "--out",
          str(tmp_path / "m.json")])
    saved = json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert saved["chat"] == 1.0 and saved["safety"] is None and saved["score"] is None
    data_file.write_text("")
    with pytest.raises(ValueError, match="no benchmark rows"):
        main(["--bench", "rewardbench", "--data", str(data_file), "--scores", str(scores)])


def test_scores_must_align_with_rows():
    rows = [{"id": "a", "image_path": "x/povid/1", "human_ranking": [0, 1]},
            {"id": "a", "image_path": "x/povid/2", "human_ranking": [0, 1]}]  # ids may repeat
    assert benchmark_metrics("vl_rewardbench", rows, [{"id": "a", "scores": [1, 0]}] * 2)["overall"] == 1.0
    with pytest.raises(ValueError, match="2 data rows"):
        benchmark_metrics("vl_rewardbench", rows, [{"id": "a", "scores": [1, 0]}])
    with pytest.raises(ValueError, match="record 2 has id 'b'"):
        benchmark_metrics("vl_rewardbench", rows, [{"id": "a", "scores": [1, 0]}, {"id": "b", "scores": [1, 0]}])
