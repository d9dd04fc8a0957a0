"""Best-of-N and data cleaning: shared prefill is exact, N=1 is plain sampling, clean.py never overwrites input."""
import argparse
import json
import os
import random

import pytest
import torch

import bon
import data
from world import weaker
import clean
from conftest import RTOL32, assert_close, randomize
from model import InternLMXComposer2, KVCache
from reward import RewardModel
from test_train import world  # noqa: F401  (the small-world fixture)


@pytest.fixture(scope="module")
def rm_dir(world, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("rm")
    rm = randomize(RewardModel.from_pretrained(world / "sft", head="score"), seed=2)
    rm.save_pretrained(d)
    return d


def test_shared_prefill_gives_the_logits_of_separate_prefills(world):  # noqa: F811
    policy = InternLMXComposer2.from_pretrained(world / "sft")
    e, m = policy.prepare("<ImageHere>How many squares are there?", [str(next((world / "world" / "images").iterdir()))])
    with torch.no_grad():
        shared = KVCache(policy.cfg, 1, e.shape[0] + 2, policy.dtype, policy.device)
        policy(e[None], m[None], cache=shared)
        shared.repeat(3)
        tok = torch.tensor([[5], [6], [7]])
        step_shared = policy(policy.model.tok_embeddings(tok), cache=shared)
        sep = KVCache(policy.cfg, 3, e.shape[0] + 2, policy.dtype, policy.device)
        policy(e[None].expand(3, -1, -1), m[None].expand(3, -1), cache=sep)
        step_sep = policy(policy.model.tok_embeddings(tok), cache=sep)
    assert_close(step_shared, step_sep, rtol=RTOL32, what="logits after a shared prefill")


def test_best_of_one_is_plain_sampling(world, rm_dir):  # noqa: F811
    policy = InternLMXComposer2.from_pretrained(world / "sft")
    rm = RewardModel.from_pretrained(rm_dir)
    best, cands, scores = bon.best_of_n(policy, [rm], "What is 2 + 3?", n=1, hd_num=9, max_new_tokens=8, seed=7)
    plain = policy.answer([("What is 2 + 3?", [])], 9, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert best == cands[0] == plain[0] and len(scores) == 1
    best4, cands4, scores4 = bon.best_of_n(policy, [rm], "What is 2 + 3?", n=4, hd_num=9, max_new_tokens=8, seed=7)
    assert best4 == cands4[max(range(4), key=lambda i: scores4[i])]
    # the same batch through the same kernels: exact in practice (observed 0), so the old tight bound stays
    assert_close(scores4, rm.get_scores([data.qa("What is 2 + 3?", c) for c in cands4], [[]] * 4, hd_num=9),
                 rtol=0, atol=1e-6, what="best-of-4 scores")


def test_batched_answers_carry_the_history(world):  # noqa: F811
    """A follow-up's prompt holds the earlier turn: `answer` with a history is `chat` with it (greedy, no
    repetition penalty), and a left-padded batch of a one-turn and a two-turn prompt answers each as alone."""
    policy = InternLMXComposer2.from_pretrained(world / "sft")
    image = [str(next((world / "world" / "images").iterdir()))]
    history = [("What colour is the circle?", "The circle is red.")]
    alone = policy.chat("Now answer in one word.", image, history, hd_num=9, max_new_tokens=8,
                        repetition_penalty=1.0)[0]
    batch = policy.answer([("What is 2 + 3?", []), ("Now answer in one word.", image, history)], 9, 8)
    assert batch[1] == alone and batch[0] == policy.answer([("What is 2 + 3?", [])], 9, 8)[0]
    texts, sequence = [], policy.sequence
    policy.sequence = lambda text, *rest: texts.append(text) or sequence(text, *rest)
    policy.answer([("Now answer in one word.", image, history)], 9, 2)
    assert texts == [data.chat_prompt("Now answer in one word.", history)] and "The circle is red." in texts[0]


def test_a_prompts_samples_do_not_depend_on_its_batch(world):  # noqa: F811
    policy = InternLMXComposer2.from_pretrained(world / "sft")
    prompts = [("What is 2 + 3?", []), ("What is 4 + 1?", []), ("Is 7 larger than 2?", [])]
    together = bon.sample_candidates(policy, prompts, 3, max_new_tokens=8, seed=5)
    apart = [bon.sample_candidates(policy, [p], 3, max_new_tokens=8, seed=5, first=i)[0] for i, p in enumerate(prompts)]
    assert together == apart
    assert bon.sample_candidates(policy, prompts[:1], 3, max_new_tokens=8, seed=6) != together[:1]
    with pytest.raises(ValueError, match="1 generators for 3 rows"):
        policy.answer(prompts[:1], 9, 4, temperature=1.0, n=3, generator=[torch.Generator()])


def test_world_bon_summary(world, rm_dir, tmp_path, capsys):  # noqa: F811
    r = bon.main(["--n", "2", "--rm", str(rm_dir), "--policy", str(world / "sft"), "--world-dir",
                  str(world / "world"), "--limit", "6", "--max-new-tokens", "6", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["accuracy_by_n"]) == {"1", "2", "4", "8"} and saved["accuracy_by_n"] == r["accuracy_by_n"]
    for k, acc in r["accuracy_by_n"].items():  # the oracle picks any right sample: never below the RM's pick
        assert acc <= r["oracle_by_n"][k]
    assert r["oracle_by_n"]["1"] == r["accuracy_by_n"]["1"]  # one candidate: nothing to choose
    fresh = bon.main(["--n", "2", "--rm", str(rm_dir), "--policy", str(world / "sft"), "--fresh", "3", "--seed", "1",
                      "--max-new-tokens", "6", "--out", str(tmp_path / "fresh")])
    assert fresh["prompts"] == 3 and (tmp_path / "fresh" / "prompts" / "heldout_prompts.json").is_file()
    assert fresh["fresh"] and not r["fresh"]
    with pytest.raises(SystemExit):
        bon.main(["--rm", str(rm_dir), "--fresh", "3", "--limit", "2", "--out", "x"])
    assert "--limit" in capsys.readouterr().err
    with pytest.raises(ValueError, match="refusing to overwrite .*summary.json"):  # before any model is loaded
        bon.main(["--rm", str(tmp_path / "nothing-here"), "--out", str(tmp_path)])


def test_rm_accuracy_on_samples_counts_right_wrong_pairs(monkeypatch, tmp_path):
    """Two prompts, 8 candidates each (world_eval samples max(1, 2, 4, 8, n)); the statistics against a hand count."""
    items = [{"kind": "colour", "question": "q0", "_dir": ""}, {"kind": "arith", "question": "q1", "_dir": ""}]
    # one failure kind in two families: a wrong colour is perception, a wrong sum text
    cands = [list("rwrwwwww"), list("wwwrwwww")]
    scores = [[1.0, 0.0, -1.0, 2.0, -5, -5, -5, -5], [0.0, 1.0, 2.0, 3.0, 4, 4, 4, 4]]
    monkeypatch.setattr(bon, "sample_candidates", lambda policy, chunk, n, *args, **kw: cands[:len(chunk)])
    monkeypatch.setattr(bon, "ensemble_scores", lambda rms, convs, *args: [x for row in scores for x in row])
    monkeypatch.setattr(bon.checker, "failure_kind", lambda it, c: None if c == "r" else "wrong_value")
    monkeypatch.setattr(bon.checker, "is_correct", lambda it, c: c == "r")
    monkeypatch.setattr(bon.store, "ensure_world", lambda d: {"heldout_prompts": ""})
    monkeypatch.setattr(bon.store, "heldout_items", lambda w: items)
    a = argparse.Namespace(world_dir="", limit=2, n=4, batch=8, hd_num=9, temperature=1.0, top_p=1.0,
                           max_new_tokens=4, seed=0, normalize=False, rm=[], policy="", fresh=None, prompts=None,
                           out=str(tmp_path), on_error="fail")
    r = bon.world_eval(None, [], a)
    # colour: right 0 (1.0) beats 5 of the 6 wrong, right 2 (-1.0) beats 4: 9/12; arith: right 3 beats 3 of 7
    assert r["rm_accuracy_on_samples_by_kind"] == {"wrong_value": 12 / 19}
    assert r["sample_pairs_by_kind"] == {"wrong_value": 19}
    assert r["sample_prompts_by_kind"] == {"wrong_value": 2}   # 19 pairs, but from two prompts
    # p = 12/19; the prompts' residuals 9 - 12p and 3 - 7p are +-27/19: sqrt(2/1 * 2 * (27/19)^2) / 19
    assert r["rm_accuracy_on_samples_se_by_kind"]["wrong_value"] == pytest.approx(54 / 361)
    assert r["rm_accuracy_on_samples_by_family"] == {"perception": 0.75, "text": 3 / 7}
    assert r["rm_accuracy_on_samples_by_family_and_kind"] == {"perception": {"wrong_value": 0.75},
                                                              "text": {"wrong_value": 3 / 7}}
    assert r["kind_family"] == {"wrong_value": ["perception", "text"]}
    assert r["accuracy_by_n"] == {"1": 0.5, "2": 0.5, "4": 0.5, "8": 0.0}
    assert r["oracle_by_n"] == {"1": 0.5, "2": 0.5, "4": 1.0, "8": 1.0}


def test_clustered_se_counts_prompts_not_pairs():
    hits = [(q, q % 3 == 0) for q in range(30)]            # one pair per prompt: the binomial standard error
    p = 10 / 30
    assert bon.clustered_se(hits) == pytest.approx((p * (1 - p) / 29) ** 0.5)
    # each prompt's pair repeated 7 times: 7x the pairs, no more information
    assert bon.clustered_se([h for h in hits for _ in range(7)]) == pytest.approx(bon.clustered_se(hits))
    assert bon.clustered_se([(0, True), (0, False)]) is None   # one prompt: no spread to measure


def test_auroc_matches_pairwise_count():
    rng = random.Random(0)
    pos, neg = [rng.gauss(0, 1) for _ in range(30)], [rng.gauss(1, 1) for _ in range(40)] + [0.5, 0.5]
    pos += [0.5]
    want = sum((p < n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert clean.auroc(pos, neg) == pytest.approx(want)


def test_clean_world_outputs_and_refuses_to_overwrite(world, rm_dir, tmp_path):  # noqa: F811
    out = tmp_path / "c"
    s = clean.main(["--rm", str(rm_dir), "--world-dir", str(world / "world"), "--out", str(out),
                    "--flag-fraction", "0.25"])
    kept, flagged = json.loads((out / "kept.json").read_text()), json.loads((out / "flagged.json").read_text())
    src = json.loads((world / "world" / "clean_set.json").read_text())
    assert len(kept) + len(flagged) == len(src) and flagged and s["flagged"] == len(flagged)
    assert {r["id"] for r in kept} | {r["id"] for r in flagged} == {r["id"] for r in src}
    # the kept file trains as it is: its samples, read from --out, name the input's images
    by_id = {r["id"]: r for r in data.read_sft(world / "world" / "clean_set.json")}
    kept_samples = data.read_sft(out / "kept.json")
    assert any(r["images"] for r in kept_samples)
    for r in kept_samples:
        want = by_id[r["id"]]["images"]
        assert len(r["images"]) == len(want) and all(os.path.samefile(a, b) for a, b in zip(r["images"], want))
    assert 0.0 <= s["auroc"] <= 1.0 and set(s["auroc_by_kind"]) <= set(weaker.NOISE_KINDS)
    noisy = {r["id"] for r in src if r["noise"]}
    assert s["noisy_in_data"] == len(noisy) > 0
    assert s["recall_at_flagged"] == pytest.approx(len(noisy & {r["id"] for r in flagged}) / len(noisy))
    html = (out / "report.html").read_text()
    assert "<svg" in html and "data:image/png;base64" in html
    # every noisy row is in the report, marked hit or miss by whether it was flagged; clean flagged rows: false alarm
    assert html.count('class="hit"') + html.count('class="miss"') == len(noisy)
    assert html.count('class="hit"') == len(noisy & {r["id"] for r in flagged})
    assert html.count('class="false-alarm"') == len(flagged) - html.count('class="hit"')
    data_file = world / "world" / "sft_train.json"
    before = data_file.read_bytes()
    with pytest.raises(ValueError, match="refusing to write over the input"):
        clean.main(["--rm", str(rm_dir), "--data", str(data_file), "--out", str(data_file)])
    with pytest.raises(ValueError, match="refusing to write over the input"):
        clean.main(["--rm", str(rm_dir), "--data", str(out / "kept.json"), "--out", str(out)])
    assert data_file.read_bytes() == before


def test_flag_rows_ties_and_broken_scores():
    scores = [0.3, -2.0, -2.0, -2.0, 1.0, float("nan"), 0.1, 2.0, float("inf")]
    flagged, rule, threshold = clean.flag_rows(scores, 0.25)   # 2 rows asked for; the tie at -2.0 flags all three
    assert flagged == {1, 2, 3, 5} and "<= -2.0" in rule
    assert clean.flag_rows(scores, 0.5, threshold=threshold)[0] == flagged   # the summary's threshold reproduces it
    assert clean.flag_rows(scores, 0.0)[0] == {5}                            # NaN always; +inf is just high
    assert clean.flag_rows(scores, 1.0)[0] == set(range(9))
    assert clean.flag_rows(scores, 0.5, threshold=0.2)[0] == {1, 2, 3, 5, 6}
    assert clean.flag_rows([1.0, 2.0, 3.0, 4.0], 0.5)[0] == {0, 1}
    assert clean.flag_rows([1.0, float("-inf"), 3.0, 4.0], 0.5)[0] == {0, 1}
    with pytest.raises(argparse.ArgumentTypeError):
        data.fraction("1.5")


def test_clean_refuses_to_overwrite_outputs_and_names_bad_rows(world, rm_dir, tmp_path):  # noqa: F811
    before = (rm_dir / "config.json").read_bytes()
    (rm_dir / "summary.json").write_text("{}")   # a training run's record
    with pytest.raises(ValueError, match="refusing to overwrite .*summary.json"):
        clean.main(["--rm", str(rm_dir), "--world-dir", str(world / "world"), "--out", str(rm_dir)])
    assert (rm_dir / "summary.json").read_text() == "{}" and (rm_dir / "config.json").read_bytes() == before
    rows = json.loads((world / "world" / "sft_train.json").read_text())[:3]
    src = tmp_path / "sft.json"
    for r in rows:
        r.pop("image", None)
    rows[1]["conversations"][1]["value"] = None
    src.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"sft.json row 2 .*string 'value'"):
        clean.main(["--rm", str(rm_dir), "--data", str(src), "--out", str(tmp_path / "c")])
    src.write_text("[]")
    with pytest.raises(ValueError, match="no rows to score"):
        clean.main(["--rm", str(rm_dir), "--data", str(src), "--out", str(tmp_path / "c")])
    # a truncated image passes the header check at read time; scoring names its row
    bad = tmp_path / "bad.png"
    good = next((world / "world" / "images").iterdir())
    bad.write_bytes(good.read_bytes()[:120])
    src.write_text(json.dumps([{"id": "x", "image": str(bad), "conversations": [
        {"from": "human", "value": "<ImageHere>What is shown?"}, {"from": "gpt", "value": "A square."}]}]))
    with pytest.raises(ValueError, match="row 1 \\(id 'x'\\).*bad.png"):
        clean.main(["--rm", str(rm_dir), "--data", str(src), "--out", str(tmp_path / "c")])


def test_clean_broken_scores_are_flagged_and_written_as_null(world, rm_dir, tmp_path, monkeypatch):  # noqa: F811
    rows = json.loads((world / "world" / "sft_train.json").read_text())[:4]
    src = tmp_path / "sft.json"
    for r in rows:
        r.pop("image", None)
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<ImageHere>", "")
    src.write_text(json.dumps(rows))
    by_id = {r["id"]: x for r, x in zip(rows, [1.0, float("nan"), 2.0, 0.5])}
    monkeypatch.setattr(clean, "score_samples", lambda rms, samples, *a, **k: [by_id[s["id"]] for s in samples])
    s = clean.main(["--rm", str(rm_dir), "--data", str(src), "--out", str(tmp_path / "c"), "--flag-fraction", "0.25"])
    strict = dict(parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    lines = [json.loads(x, **strict) for x in (tmp_path / "c" / "scores.jsonl").read_text().splitlines()]
    assert [x["score"] for x in lines] == [1.0, None, 2.0, 0.5] and s["broken_scores"] == 1
    flagged = json.loads((tmp_path / "c" / "flagged.json").read_text(), **strict)
    assert [r["id"] for r in flagged] == [rows[1]["id"]]   # 25% of 4 rows: the NaN row takes the one place
    json.loads((tmp_path / "c" / "summary.json").read_text(), **strict)
    assert "<svg" in (tmp_path / "c" / "report.html").read_text()


def test_clean_flags_preference_rows_by_margin(world, rm_dir, tmp_path, monkeypatch):  # noqa: F811
    """On reward-format data a row's score is reward(chosen) - reward(rejected): the pair whose rejected answer
    outscores its chosen one is flagged, not the pairs whose rejected side merely scores low."""
    rows = json.loads((world / "world" / "pref_train.json").read_text())[:4]
    src = tmp_path / "pairs.json"
    src.write_text(json.dumps([dict(r, image=str(world / "world" / r["image"])) if "image" in r else r
                               for r in rows]))
    side_scores = [1.0, -5.0, 2.0, -4.0, -1.0, 3.0, 0.5, -6.0]   # chosen, rejected per row; row 2 is mislabelled
    by_side = {(r["id"], side): x for r, pair in zip(rows, zip(side_scores[::2], side_scores[1::2]))
               for side, x in zip(("chosen", "rejected"), pair)}
    monkeypatch.setattr(clean, "score_samples", lambda rms, samples, *a, **k: [by_side[s["id"], s["side"]]
                                                                              for s in samples])
    s = clean.main(["--rm", str(rm_dir), "--data", str(src), "--out", str(tmp_path / "c"), "--flag-fraction", "0.25"])
    flagged = json.loads((tmp_path / "c" / "flagged.json").read_text())
    assert s["score"] == "margin" and [r["id"] for r in flagged] == [rows[2]["id"]]
    assert clean.row_scores([{"row": 0, "side": "chosen"}, {"row": 0, "side": "rejected"}], [1.0, 3.0]) == [-2.0]
    assert "chosen (-1.000)" in (tmp_path / "c" / "report.html").read_text()


def test_cli_device_and_dtype_reach_the_model(world, rm_dir, tmp_path, capsys):  # noqa: F811
    """`--dtype bfloat16` loads the weights in bf16 (the GPU default; CPU here) and scores within bf16 rounding of
    fp32; `--dtype auto` is float32 on the CPU."""
    import reward
    import model
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps(data.qa("What is 2 + 3?", "2 + 3 = 5.")))
    scores = {}
    for dtype in ("auto", "bfloat16"):
        reward.main(["--ckpt", str(rm_dir), "--conv", str(conv), "--dtype", dtype, "--device", "cpu"])
        scores[dtype] = float(capsys.readouterr().out.strip())
    want = RewardModel.from_pretrained(rm_dir).get_score(data.qa("What is 2 + 3?", "2 + 3 = 5."))
    assert_close(scores["auto"], want, rtol=0, atol=1e-5, what="--dtype auto")  # the same forward, printed .6f
    # bf16 keeps 8 significant bits (eps 3.9e-3) in every weight and activation: 0.05 is 13 eps of the score, or of 1
    # when the score cancels below it (observed 3.9e-3 relative)
    assert_close(scores["bfloat16"], want, rtol=0, atol=0.05 * max(1.0, abs(want)), what="--dtype bfloat16")
    assert scores["bfloat16"] != want
    p = argparse.ArgumentParser()
    model.add_device_args(p)
    assert model.device_kwargs(p.parse_args(["--device", "cuda:1"])) == {"dtype": torch.bfloat16, "device": "cuda:1"}
    assert model.device_kwargs(p.parse_args(["--device", "cpu"]))["dtype"] == torch.float32


def test_default_reward_model_is_runs_rm_and_its_absence_names_the_command(world, rm_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)   # no runs/rm here
    for main in (bon.main, clean.main):
        with pytest.raises(FileNotFoundError, match=r"no reward model in runs/rm: .*train\.py --stage rm"):
            main([])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "rm").symlink_to(rm_dir)
    s = clean.main(["--world-dir", str(world / "world"), "--flag-fraction", "0.2"])   # --out: runs/clean
    assert (tmp_path / "runs" / "clean" / "summary.json").is_file() and s["rm"] == ["runs/rm"]


def test_otsu_threshold_cuts_between_two_modes():
    rng = random.Random(0)
    low, high = [rng.gauss(-3, 0.5) for _ in range(300)], [rng.gauss(2, 0.5) for _ in range(700)]
    cut = clean.otsu_threshold(low + high)
    assert max(low) < cut < min(high)
    flagged, rule, at = clean.flag_rows(low + high + [float("nan")], "auto")
    assert flagged == set(range(300)) | {1000} and "Otsu" in rule and at == cut
    assert clean.otsu_threshold([1.0, 1.0, 1.0]) == float("-inf")   # one value: nothing to separate


def test_clean_with_labels_reports_families_and_the_rule_it_printed(world, rm_dir, tmp_path):  # noqa: F811
    """The world's SFT rows scored against its labelled failures (sft_errors.json, by id): every figure recounted
    from scores.jsonl and the labels."""
    src, labels = world / "world" / "sft_train.json", world / "world" / "sft_errors.json"
    out = tmp_path / "c"
    s = clean.main(["--rm", str(rm_dir), "--data", str(src), "--labels", str(labels), "--flag-fraction", "auto",
                    "--out", str(out)])
    rows, errors = json.loads(src.read_text()), {e["id"]: e for e in json.loads(labels.read_text())}
    scores = {r["id"]: r["score"] for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}
    flagged = {r["id"] for r in json.loads((out / "flagged.json").read_text())}
    assert flagged == {i for i, x in scores.items() if x < s["threshold"]}     # the rule printed is the rule applied
    assert s["rule"].startswith(f"score < {s['threshold']:.4f}")
    noisy = {r["id"] for r in rows if r["id"] in errors}
    assert s["noisy_in_data"] == len(noisy) > 0
    assert sum(s["rows_by_family"].values()) == sum(s["rows_by_kind"].values()) == len(noisy)
    for fam, n in s["rows_by_family"].items():
        ids = {i for i in noisy if errors[i]["family"] == fam}
        assert n == len(ids) and s["recall_at_flagged_by_family"][fam] == pytest.approx(len(ids & flagged) / len(ids))
        want = clean.auroc([scores[i] for i in ids], [scores[r["id"]] for r in rows if r["id"] not in errors])
        assert s["auroc_by_family"][fam] == pytest.approx(want)
    assert s["precision_at_flagged"] == pytest.approx(len(noisy & flagged) / max(len(flagged), 1))
    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps([{"id": "nobody", "kind": "x"}]))
    with pytest.raises(ValueError, match="labels.json: names none of"):
        clean.main(["--rm", str(rm_dir), "--data", str(src), "--labels", str(bad), "--out", str(tmp_path / "d")])
    bad.write_text(json.dumps([{"id": rows[0]["id"]}]))
    with pytest.raises(ValueError, match="labels.json: row 1: expected an object with 'id' and 'kind'"):
        clean.main(["--rm", str(rm_dir), "--data", str(src), "--labels", str(bad), "--out", str(tmp_path / "d")])
