"""Scoring at scale (scoring.py): clean.py and bon.py under torchrun write what one process writes, a run killed
mid-write (SIGKILL) and resumed writes what an uninterrupted one writes, another run's directory is refused, a
failing row is named and skipped or fatal, and evaluate.py's scores are resumable too. The small world of
test_train.py (its cleaning set: 32 rows) with a tiny random reward model; small token budgets make several
batches per rank."""
import json
import os
import subprocess
import sys

import pytest

import bon
import clean
import evaluate
import scoring
from conftest import ROOT, RTOL32, SCORE_ATOL, assert_close
from test_bon_clean import rm_dir  # noqa: F401  (the tiny reward model)
from test_train import world  # noqa: F401  (the small-world fixture)

TIMINGS = {"seconds", "matmul_gflops", "processes"}   # the only summary fields that may differ between runs
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")


def launch(script, args, procs=1, kill_after=None):
    """`script` in fresh processes (torchrun with gloo when procs > 1); with kill_after, through
    tests/killed_scoring.py, whose rank 0 dies by SIGKILL in the middle of a write."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    entry = ["tests/killed_scoring.py", script] if kill_after is not None else [script]
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AFTER=str(kill_after))
    r = subprocess.run([sys.executable, *torchrun, *entry, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert (r.returncode != 0) == (kill_after is not None), r.stderr[-3000:]
    return r


def clean_args(world, rm_dir, out, *extra):  # noqa: F811
    return ["--rm", str(rm_dir), "--world-dir", str(world / "world"), "--out", str(out), "--token-budget", "600",
            "--flag-fraction", "0.25", *extra]


def assert_same_clean(a, b):
    """Same rows scored (to float tolerance), flagged and kept, and the same summary but for its timings."""
    sa, sb = ([json.loads(x) for x in (d / "scores.jsonl").read_text().splitlines()] for d in (a, b))
    assert [(x["id"], x["side"]) for x in sa] == [(x["id"], x["side"]) for x in sb]
    assert_close([x["score"] for x in sb], [x["score"] for x in sa], rtol=RTOL32, atol=SCORE_ATOL, what="scores")
    for name in ("flagged.json", "kept.json"):
        assert [r["id"] for r in json.loads((a / name).read_text())] == \
            [r["id"] for r in json.loads((b / name).read_text())], name
    ja, jb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ja.items() if k not in TIMINGS} == {k: v for k, v in jb.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def clean_one(world, rm_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("clean") / "one"
    clean.main(clean_args(world, rm_dir, out))
    return out


@linux_only
def test_clean_two_processes_equal_one(world, rm_dir, clean_one, tmp_path):  # noqa: F811
    launch("clean.py", clean_args(world, rm_dir, tmp_path / "two"), procs=2)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert len(list((tmp_path / "two" / "scoring").glob("rank-*.jsonl"))) == 2
    assert_same_clean(clean_one, tmp_path / "two")


@linux_only
def test_clean_killed_then_resumed_equals_uninterrupted(world, rm_dir, clean_one, tmp_path, monkeypatch):  # noqa: F811
    """Killed on 2 processes in the middle of a line, resumed on 1 (the ranks' files are read whatever their
    number); a finished run asked to resume loads no model and writes nothing."""
    out = tmp_path / "killed"
    launch("clean.py", clean_args(world, rm_dir, out), procs=2, kill_after=1)
    part = (out / "scoring" / "rank-0.jsonl").read_bytes()
    assert part and not part.endswith(b"\n"), "the kill did not cut a line"
    assert not (out / "summary.json").exists()
    scored = len(scoring.read_records(out))
    assert 0 < scored < 32
    clean.main(clean_args(world, rm_dir, out, "--resume"))
    assert_same_clean(clean_one, out)
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*")}
    monkeypatch.setattr(clean.RewardModel, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    assert clean.main(clean_args(world, rm_dir, out, "--resume")) == json.loads((out / "summary.json").read_text())
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*")} == before


def test_another_runs_directory_is_refused(world, rm_dir, clean_one, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="holds the scores of another run \\(its hd_num differ\\)"):
        clean.main(clean_args(world, rm_dir, clean_one, "--resume", "--hd-num", "6"))
    with pytest.raises(ValueError, match="refusing to overwrite .*kept.json"):
        clean.main(clean_args(world, rm_dir, clean_one))
    (tmp_path / "scoring").mkdir()
    (tmp_path / "scoring" / "run.json").write_text((clean_one / "scoring" / "run.json").read_text())
    with pytest.raises(ValueError, match="already holds this run's scores; pass --resume"):
        clean.main(clean_args(world, rm_dir, tmp_path))
    with pytest.raises(FileNotFoundError, match="--resume: .*holds no scoring run"):
        clean.main(clean_args(world, rm_dir, tmp_path / "new", "--resume"))


def test_failing_rows_are_named_then_skipped_or_fatal(world, rm_dir, tmp_path):  # noqa: F811
    """A missing image and a row over --max-length: named by row and id and fatal by default (the missing image
    when the file is read, before any model loads), left out of kept.json and flagged.json and listed with their
    reasons under --on-error skip."""
    rows = json.loads((world / "world" / "sft_train.json").read_text())[:6]
    for r in rows:
        if "image" in r:
            r["image"] = [str(world / "world" / p) for p in r["image"]]
    gone = next(r for r in rows if "image" in r)
    gone["image"] = str(tmp_path / "gone.png")
    long = next(r for r in rows if r is not gone)
    long["conversations"][1]["value"] = "very long " * 200
    src, readable = tmp_path / "rows.json", tmp_path / "readable.json"
    src.write_text(json.dumps(rows))
    readable.write_text(json.dumps([r for r in rows if r is not gone]))
    args = ["--rm", str(rm_dir), "--max-length", "300"]
    with pytest.raises(FileNotFoundError, match="rows.json row .*image not found: .*gone.png"):
        clean.main(args + ["--data", str(src), "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match=f"readable.json row \\d+ \\(id {long['id']!r}\\): \\d+ tokens, over "
                                         "--max-length 300"):
        clean.main(args + ["--data", str(readable), "--out", str(tmp_path / "b")])
    s = clean.main(args + ["--data", str(src), "--out", str(tmp_path / "c"), "--on-error", "skip"])
    reasons = {x["id"]: x["reason"] for x in s["skipped"]}
    assert set(reasons) == {gone["id"], long["id"]} and reasons[gone["id"]].startswith("image not found")
    assert reasons[long["id"]].endswith("tokens, over --max-length 300")
    written = [r["id"] for name in ("kept.json", "flagged.json")
               for r in json.loads((tmp_path / "c" / name).read_text())]
    assert sorted(written) == sorted(r["id"] for r in rows if r["id"] not in reasons) and s["rows"] == 4


def test_a_torn_last_line_is_dropped_and_cut_before_appending(tmp_path):
    (tmp_path / "scoring").mkdir()
    part = tmp_path / "scoring" / "rank-0.jsonl"
    part.write_bytes(b'{"row": 0, "score": 1.5}\n{"row": 2, "score": NaN}\n{"row": 1, "sc')
    done = scoring.read_records(tmp_path)
    assert set(done) == {0, 2} and done[2]["score"] != done[2]["score"]   # NaN survives, to be flagged
    with scoring._open_own(tmp_path, 0) as f:
        f.write('{"row": 1, "score": 0.5}\n')
    assert scoring.read_records(tmp_path)[1] == {"row": 1, "score": 0.5}
    part.write_bytes(b'{"row": 0, "score": 1.5}\n{"row": 2, "sc\n{"row": 1, "score": 0.5}\n')
    with pytest.raises(ValueError, match="rank-0.jsonl:2: not a whole JSON record"):
        scoring.read_records(tmp_path)


def test_a_nan_score_never_wins_best_of_n():
    nan = float("nan")
    assert bon.pick_best([nan, 0.5, 0.2], 3) == 1 and bon.pick_best([0.1, nan], 2) == 0
    assert bon.pick_best([nan, nan], 1) == 0   # nothing else to pick: still counted in nan_scores


def bon_args(world, rm_dir, out, *extra):  # noqa: F811
    return ["-n", "2", "--rm", str(rm_dir), "--policy", str(world / "sft"), "--world-dir", str(world / "world"),
            "--limit", "8", "--batch", "2", "--max-new-tokens", "6", "--out", str(out), *extra]


@linux_only
def test_bon_two_processes_killed_and_resumed_equal_one(world, rm_dir, tmp_path):  # noqa: F811
    """Best-of-N on 8 held-out prompts: killed on 2 processes mid-write and resumed on 2, its candidates equal one
    uninterrupted process's (each candidate has its own generator), its scores within float tolerance and its
    summary equal."""
    one = bon.main(bon_args(world, rm_dir, tmp_path / "one"))
    launch("bon.py", bon_args(world, rm_dir, tmp_path / "two"), procs=2, kill_after=1)
    assert 0 < len(scoring.read_records(tmp_path / "two")) < 8
    launch("bon.py", bon_args(world, rm_dir, tmp_path / "two", "--resume"), procs=2)
    a, b = scoring.merged(tmp_path / "one", 8), scoring.merged(tmp_path / "two", 8)
    assert [r["candidates"] for r in a] == [r["candidates"] for r in b]
    assert_close([r["scores"] for r in b], [r["scores"] for r in a], rtol=RTOL32, atol=SCORE_ATOL, what="scores")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and two["nan_scores"] == 0
    assert {k: v for k, v in one.items() if k not in TIMINGS} == {k: v for k, v in two.items() if k not in TIMINGS}


def test_evaluate_scores_resumably_into_scores_dir(rm_dir, tmp_path):  # noqa: F811
    """evaluate.py --ckpt into --scores-dir gives the metrics of a plain run, a scores.jsonl that --scores reads back
    to the same metrics, and a killed run (rows missing from its files) resumes to the same."""
    subsets = ["alpacaeval-easy", "mt-bench-hard", "donotanswer"]
    rows = [{"id": i, "subset": subsets[i % 3], "prompt": f"What is {i} + 1?", "chosen": f"{i} + 1 = {i + 1}.",
             "rejected": "I do not know." if i % 2 else f"{i} + 1 = {i + 7}."} for i in range(9)]
    src = tmp_path / "rb.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--bench", "rewardbench", "--data", str(src), "--ckpt", str(rm_dir), "--token-budget", "200"]
    plain = evaluate.main(base)
    saved = evaluate.main(base + ["--scores-dir", str(tmp_path / "s")])
    null = evaluate.finite_or_null   # NaN != NaN: an empty section's NaN compared as null
    assert null(saved) == null(plain) and saved["nan_rows"] == 0 and saved["skipped"] == []
    again = evaluate.main(["--bench", "rewardbench", "--data", str(src), "--scores",
                           str(tmp_path / "s" / "scores.jsonl")])
    assert null(again) == null({k: v for k, v in plain.items() if k not in ("nan_rows", "skipped")})
    part = tmp_path / "s" / "scoring" / "rank-0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:4]) + lines[4][:10])   # as a kill leaves it: 4 rows and a torn one
    (tmp_path / "s" / "metrics.json").unlink()
    resumed = evaluate.main(base + ["--scores-dir", str(tmp_path / "s"), "--resume"])
    assert_close([resumed[k] for k in ("chat", "chat_hard", "safety")], [saved[k] for k in ("chat", "chat_hard",
                                                                                           "safety")], rtol=0)
    assert len(part.read_text().splitlines()) == 9
