"""Training stages on a small built-in world: the loss is Eq. 1, frozen weights stay frozen, resume and 2-process
runs reproduce a plain run, the filters and the batcher do what they say, bad data fails naming file and row."""
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from pathlib import Path
import torch
from safetensors.torch import load_file

from conftest import ASSETS, REAL_TOKENIZER, ROOT, RTOL32, SCORE_ATOL, assert_close
import common
import batching
import data
import train
from world import WORLD_VERSION, checker, store, weaker
from model import Config, InternLMXComposer2, init_weights

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             plora_rank=4, max_position_embeddings=1024, max_length=512,
             vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=112, patch_size=14))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world (same generator, fewer rows) and a tiny random 'SFT policy' to start from."""
    root = tmp_path_factory.mktemp("w")
    wd = root / "world"
    wd.mkdir()
    paths = store.write_world(str(wd), seed=0, n_sft=64, n_pref=96, n_heldout=16, n_sft_easy=16)
    rows = sum((json.loads(open(p).read()) for p in paths.values()), [])
    store.train_world_tokenizer(store.template_texts(rows), str(wd / "tokenizer.model"))
    (wd / "world.json").write_text(json.dumps({"version": WORLD_VERSION,
                                               "files": {k: os.path.basename(p) for k, p in paths.items()}}))
    tok = data.Tokenizer(wd / "tokenizer.model")
    policy = init_weights(InternLMXComposer2(Config(**SMALL, vocab_size=tok.vocab_size)), seed=0)
    policy.tokenizer = tok
    policy.save_pretrained(root / "sft")
    return root


def run(world, out, *extra, stage="rm"):
    return train.main(["--stage", stage, "--out", str(out), "--world-dir", str(world / "world"), "--init",
                       str(world / "sft"), "--batch", "8", "--steps", "4", "--save-every", "2", *extra])


def test_bt_loss_is_eq1():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 1.0, -1.0])
    want = sum(-math.log(1 / (1 + math.exp(-(x - y)))) for x, y in zip(c.tolist(), r.tolist()))
    assert train.bt_loss(c, r).item() == pytest.approx(want, rel=1e-6)
    centred = want + 0.1 * sum((x + y) ** 2 for x, y in zip(c.tolist(), r.tolist()))   # 0.9 + 0.1 + 0.4
    assert train.bt_loss(c, r, center_coef=0.1).item() == pytest.approx(centred, rel=1e-6)


def test_centering_pulls_the_mean_reward_to_zero(world, tmp_path):
    """The same 4 steps with and without --center-coef: only the centred run's rewards move toward 0 on average
    (Eq. 1 alone never sees the sum of a pair's rewards)."""
    plain, centred = run(world, tmp_path / "plain"), run(world, tmp_path / "centred", "--center-coef", "10")
    assert abs(centred["reward_mean"]) < 0.5 * abs(plain["reward_mean"])


def test_rm_stage_freezes_vision_and_writes_outputs(world, tmp_path):
    summary = run(world, tmp_path / "rm")
    before, after = load_file(str(world / "sft" / "model.safetensors")), load_file(str(tmp_path / "rm" / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("vit.", "vision_proj."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["model.layers.0.attention.wqkv.weight"], after["model.layers.0.attention.wqkv.weight"])
    assert not torch.equal(before["plora_glb_GN"], after["plora_glb_GN"])  # separators train, as upstream
    assert "score.weight" in after and "output.weight" not in after
    assert set(summary["heldout_accuracy_by_kind"]) <= set(weaker.PREF_KINDS) | \
        set(checker.IGNORED.values()) | {"repeated_answer"}
    assert set(summary["heldout_accuracy_by_family"]) <= {"instruction", "perception", "text", "followup"}
    check = summary["image_check"]   # the perception pairs scored with their images and with blank ones
    assert check["pairs"] == sum(p["family"] == "perception" and bool(p["images"]) for p in
                                 data.read_preference(world / "world" / "pref_heldout.json"))
    assert 0 <= check["accuracy_blank_image"] <= 1 and 0 <= check["accuracy_with_image"] <= 1
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["reward_std"] == pytest.approx(summary["reward_std"])
    lines = (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4
    with pytest.raises(SystemExit, match="--resume"):
        run(world, tmp_path / "rm")


def test_perception_repeat_shows_the_policys_perception_errors_k_times(world, tmp_path):
    rows = json.loads((world / "world" / "pref_train.json").read_text())
    for i, r in enumerate(rows):   # the tiny world's pairs are synthetic: label a few as the policy's own errors
        r["source"], r["family"] = [("policy", "perception"), ("policy", "instruction")][i % 5] if i % 5 < 2 else \
            ("synthetic", "perception")
        r["image"] = [str(world / "world" / im) for im in ([r["image"]] if isinstance(r.get("image"), str) else
                                                             r.get("image", []))]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    args = ["--stage", "rm", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "pairs.json")]
    once, _ = train.rm_data(train.parse_args(args), 0)
    thrice, _ = train.rm_data(train.parse_args(args + ["--perception-repeat", "3"]), 0)
    count = Counter(p["id"] for p in thrice)
    assert count == Counter({p["id"]: 3 if (p["source"], p["family"]) == ("policy", "perception") else 1 for p in once})
    assert 3 in count.values() and len(thrice) > len(once)
    for r in rows:
        r["source"] = "synthetic"
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    with pytest.raises(SystemExit, match="pairs.json has family 'perception' and source 'policy'"):
        train.rm_data(train.parse_args(args + ["--perception-repeat", "3"]), 0)


def test_shared_prefix_equals_scoring_each_alone(world):
    """RewardModel.pair_rewards runs a pair's image + prompt once: rewards and gradients equal the plain forward of
    every sequence alone (left-padded prefixes, right-padded answers, a two-image pair that cannot share)."""
    from reward import RewardModel
    rm = RewardModel.from_pretrained(world / "sft", head="score", seed=1)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    pairs = data.read_preference(world / "world" / "pref_train.json")[:6]
    seqs = [rm.sequence(data.reward_template(c), p["images"], 9) for p in pairs for c in (p["chosen"], p["rejected"])]
    assert any(p["images"] for p in pairs) and any(not p["images"] for p in pairs)

    def grads(fn):
        rm.zero_grad()
        r = fn(seqs)
        (r * torch.arange(1.0, len(r) + 1)).sum().backward()
        return r.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
    (r0, g0), (r1, g1) = grads(rm.rewards_alone), grads(rm.pair_rewards)
    assert_close(r1, r0, rtol=RTOL32, atol=SCORE_ATOL, what="rewards")
    assert set(g0) == set(g1)
    # a gradient is rounded on the scale of its module's: a bias's can cancel to 0 where the weight's does not (a
    # key bias's is exactly 0 in exact arithmetic: softmax ignores a shift shared by all keys)
    module = {n: n.rpartition(".")[0] for n in g0}
    scale = {m: max(g0[n].abs().max().item() for n in g0 if module[n] == m) for m in module.values()}
    for n, g in g0.items():
        assert_close(g1[n], g, rtol=RTOL32, atol=RTOL32 * scale[module[n]], what=f"gradient of {n}")
    img = pairs[0]["images"] or pairs[1]["images"]
    two = [rm.sequence(data.reward_template(data.qa("A <ImageHere> B <ImageHere>?", ans)), img * 2, 9)
           for ans in ("yes", "no")]
    assert_close(rm.pair_rewards(two), rm.rewards_alone(two), rtol=RTOL32, atol=SCORE_ATOL, what="two-image rewards")
    with pytest.warns(UserWarning, match="truncated to max_length 20"):  # over-long: cut as upstream, said loudly
        assert rm.pair_rewards(seqs, max_length=20).shape == (len(seqs),)


def test_mlp_head(world, tmp_path):
    run(world, tmp_path / "mlp", "--head", "mlp", "--steps", "2")
    assert "score.0.weight" in load_file(str(tmp_path / "mlp" / "model.safetensors"))


def test_resume_is_bit_identical(world, tmp_path):
    run(world, tmp_path / "a", "--steps", "6")
    run(world, tmp_path / "b", "--steps", "6", "--stop-after", "3")
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):  # never trained over by accident
        run(world, tmp_path / "b", "--steps", "6")
    run(world, tmp_path / "b", "--steps", "6", "--resume")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_smaller_than_the_processes_is_refused(world, tmp_path, monkeypatch):
    """Checked before any collective: a rank without a sample would hang the step's all-reduce."""
    monkeypatch.setattr(common, "setup_distributed", lambda: (0, 4, torch.device("cpu")))
    with pytest.raises(SystemExit, match="--batch 2 is smaller than the 4 processes"):
        run(world, tmp_path / "c", "--steps", "1", "--batch", "2")


def test_gradient_checkpointing_trains_the_same_weights(world, tmp_path, monkeypatch):
    """--grad-ckpt recomputes activations in backward (and turns prompt sharing off): same weights as a plain run."""
    import torch.utils.checkpoint
    run(world, tmp_path / "a", "--steps", "3", "--share-prefix", "0")
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *x, **k: calls.append(1) or checkpoint(*x, **k))
    run(world, tmp_path / "b", "--steps", "3", "--grad-ckpt")
    assert calls  # every decoder layer of every training forward
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in a:  # recomputation replays the same kernels on the same shapes: exact in practice (observed 0)
        assert_close(b[k], a[k], rtol=0, atol=1e-6, what=k)


def test_sft_stage_learns_only_answers(world, tmp_path):
    summary = run(world, tmp_path / "sft", stage="sft")
    assert 0.0 <= summary["heldout_accuracy"] <= 1.0 and "colour" in summary["heldout_accuracy_by_kind"]
    tok = data.Tokenizer(world / "world" / "tokenizer.model")
    sample = data.read_sft(world / "world" / "sft_train.json")[0]
    answer = data.sft_segments(tok, sample)[0][-1]
    assert tok.decode(answer[:-1]) == sample["conversation"][-1]["content"]  # the loss covers the answer + end of turn
    assert answer[-1] == tok.eot_id


def test_heldout_file_with_data(world, tmp_path):
    """--data with --heldout: sft reports the world checker's greedy accuracy on those prompts, rm its pair accuracy."""
    w = world / "world"
    summary = run(world, tmp_path / "sft", "--data", str(w / "sft_train.json"), "--heldout",
                  str(w / "heldout_prompts.json"), "--steps", "2", stage="sft")
    model = InternLMXComposer2.from_pretrained(tmp_path / "sft")
    result = checker.eval_policy(model, store.heldout_items(w / "heldout_prompts.json"))
    assert summary["heldout_accuracy"] == result["accuracy"] and \
        summary["heldout_accuracy_by_kind"] == result["accuracy_by_kind"]
    summary = run(world, tmp_path / "rm", "--data", str(w / "pref_train.json"), "--heldout",
                  str(w / "pref_heldout.json"), "--steps", "2")
    assert 0.0 <= summary["heldout_accuracy"] <= 1.0 and "wrong_value" in summary["heldout_accuracy_by_kind"]
    with pytest.raises(ValueError, match="pref_train.json row 1: expected a world held-out prompt"):
        run(world, tmp_path / "sft2", "--data", str(w / "sft_train.json"), "--heldout", str(w / "pref_train.json"),
            "--steps", "1", stage="sft")
    rows = json.loads((w / "heldout_prompts.json").read_text())
    (tmp_path / "h.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "query"} for r in rows]))
    with pytest.raises(ValueError, match="h.json row 1: .*'query'"):   # the checker reads it: refused up front
        store.heldout_items(tmp_path / "h.json")
    with pytest.raises(SystemExit, match="--heldout goes with --data"):
        run(world, tmp_path / "rm2", "--heldout", str(w / "pref_heldout.json"))


def test_sft_trains_every_answer_of_a_multi_turn_sample(world):
    """A two-turn sample is the chat template with history, each answer + end-of-turn tokenized apart and trained
    on; a one-turn sample is exactly the chat prompt followed by its answer + end-of-turn, as before."""
    model = InternLMXComposer2.from_pretrained(world / "sft")
    tok = model.tokenizer
    image = str(next((world / "world" / "images").iterdir()))
    conv = data.qa("<ImageHere>What colour is the square?", "The square is red.") + \
        data.qa("How many circles are there?", "The number of circles is 2.")
    segments, flags = data.sft_segments(tok, {"conversation": conv, "images": [image]})
    ids = [t for seg in segments if isinstance(seg, list) for t in seg]
    assert tok.decode([t for t, f in zip(ids, flags) if f], skip_special_tokens=False) == \
        "The square is red." + data.END_OF_TURN + "The number of circles is 2." + data.END_OF_TURN
    text = "".join(data.IMAGE_PLACEHOLDER if isinstance(seg, int) else tok.decode(seg, skip_special_tokens=False)
                   for seg in segments)
    want = data.chat_prompt("How many circles are there?", [(conv[0]["content"], conv[1]["content"])])
    assert text == want + "The number of circles is 2." + data.END_OF_TURN and segments[0][0] == tok.bos_id
    objective = train.SFTObjective(model, hd_num=9)
    loss = objective(objective.prepare([{"conversation": conv, "images": [image]}]))
    with torch.no_grad():  # a naive loop: every text position whose token is an answer token, predicted from before
        batch = model.embed_batch([(segments, model.load_images([image], 9))])
        logp = torch.log_softmax(model(batch["embeds"], batch["im_mask"], batch["attention_mask"])[0], -1)
        text = [p for p in range(batch["ids"].shape[1]) if batch["ids"][0, p] != -100]
        nll = [-logp[p - 1, batch["ids"][0, p]] for p, f in zip(text, flags) if f]
    assert loss.item() == pytest.approx((sum(nll) / len(nll)).item(), rel=1e-5)
    sample = data.read_sft(world / "world" / "sft_train.json")[0]
    segments, flags = data.sft_segments(tok, sample)
    prompt, _ = model.sequence(data.sft_prompt(sample), sample["images"], 9)
    answer = tok.encode(sample["conversation"][-1]["content"] + data.END_OF_TURN, add_special_tokens=False)
    assert segments == prompt + [answer] and flags[-len(answer):] == [True] * len(answer) and sum(flags) == len(answer)


def launch(args, procs=1, script="train.py"):
    """train.py with `args` in a fresh process, or under torchrun with `procs` processes (gloo); must exit 0."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    r = subprocess.run([sys.executable, *torchrun, script, *args], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_rm(world, out, *extra, procs=1):
    """3 rm steps of a global batch of 8 in a fresh process, or under torchrun with `procs` processes (gloo). The
    small token budget makes several micro-batches per step, a different number on each rank at step 1."""
    launch(["--stage", "rm", "--world-dir", str(world / "world"), "--init", str(world / "sft"), "--batch", "8",
            "--steps", "3", "--save-every", "3", "--token-budget", "200", "--out", str(out), *extra], procs)
    return out


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    return run_rm(world, tmp_path_factory.mktemp("one") / "out")


@pytest.fixture(scope="module")
def fsdp_two(world, tmp_path_factory):
    return run_rm(world, tmp_path_factory.mktemp("fsdp") / "out", "--fsdp", procs=2)


def assert_same_weights(a, b, exact=False):
    """Equal up to reduction order: a rarely seen token's Adam step m / sqrt(v) turns 1e-9 gradient noise into
    ~3e-5, far below the 1e-3-sized steps a wrong gradient average would leave."""
    a, b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0 if exact else 1e-4, rtol=0 if exact else 1e-4, msg=k)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
def test_two_processes_equal_one(world, tmp_path, one_process):
    """torchrun --nproc_per_node 2 (gloo, DDP) with the same global batch gives the 1-process weights, and logs the
    loss and accuracy of the whole batch, not rank 0's half."""
    two = run_rm(world, tmp_path / "two", procs=2)
    assert_same_weights(one_process, two)
    logged = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one_process, two)]
    last = [next(r for r in reversed(rows) if "loss" in r) for rows in logged]
    assert last[0]["step"] == last[1]["step"] == 3 and last[0]["accuracy"] == last[1]["accuracy"]
    assert last[1]["loss"] == pytest.approx(last[0]["loss"], rel=1e-4)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
def test_fsdp_two_processes_equal_one(one_process, fsdp_two):
    """--fsdp (FSDP2 on gloo) trains as one process, and its checkpoint holds whole tensors in the same layout:
    the weights, and Adam's moments in resume.safetensors."""
    assert_same_weights(one_process, fsdp_two)
    a, b = load_file(str(one_process / "resume.safetensors")), load_file(str(fsdp_two / "resume.safetensors"))
    assert set(a) == set(b) and any(k.endswith("exp_avg") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
def test_fsdp_resume_is_identical(world, tmp_path, fsdp_two):
    """An --fsdp run stopped after 2 steps and resumed (shards re-made from the whole saved tensors) ends with the
    weights of an uninterrupted --fsdp run."""
    run_rm(world, tmp_path / "b", "--fsdp", "--stop-after", "2", procs=2)
    run_rm(world, tmp_path / "b", "--fsdp", "--resume", procs=2)
    assert_same_weights(fsdp_two, tmp_path / "b", exact=True)


def test_bf16_autocast_trains_on_cpu(world, tmp_path, one_process):
    """--autocast bf16 (forced on CPU; auto is off there) trains: finite loss and rewards, the weights move, and they
    move as the fp32 run's do but not equally (the forward really ran in bf16)."""
    summary = run(world, tmp_path / "bf16", "--steps", "3", "--save-every", "3", "--token-budget", "200",
                  "--autocast", "bf16")
    last = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["loss"]) and math.isfinite(summary["reward_mean"])
    start = load_file(str(world / "sft" / "model.safetensors"))
    bf16, fp32 = load_file(str(tmp_path / "bf16" / "model.safetensors")), load_file(str(one_process / "model.safetensors"))
    w = "model.layers.0.attention.wqkv.weight"
    assert not torch.equal(bf16[w], start[w])
    assert not torch.equal(bf16[w], fp32[w])
    # 3 Adam steps at lr 3e-4 move a weight by <= ~1e-3, so no bound on the weights can fail: compare the updates.
    # bf16 misses fp32's by 12% of its norm (observed; Adam's m / sqrt(v) magnifies the rounding of tiny gradients),
    # no step at all by 100%, an unrelated one by ~140%
    step_bf16, step_fp32 = bf16[w] - start[w], fp32[w] - start[w]
    miss = ((step_bf16 - step_fp32).norm() / step_fp32.norm()).item()
    assert miss < 0.5, f"bf16 update misses the fp32 update by {miss:.2f} of its norm"


def test_check_data_and_length_filter():
    conv = lambda text: [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]  # noqa: E731
    assert data.check_data(conv("A fine answer."))
    for bad in ("", "   ", "<|im_start|>hi", "done <|im_end|>", "x" * 501, "a " * 200 + "y" * 120):
        assert not data.check_data(conv(bad)), bad
    assert data.check_data(conv("a " * 300))  # long but made of words
    pair = lambda c, r: {"chosen": conv(c), "rejected": conv(r)}  # noqa: E731
    assert data.length_ok(pair("x" * 25, "y" * 10), 2.5) and not data.length_ok(pair("x" * 26, "y" * 10), 2.5)
    assert data.length_ok(pair("x" * 5, "y" * 100), 2.5)  # only chosen-much-longer pairs are dropped


def test_image_text_mix_is_two_to_one_while_both_last():
    has_image = [True] * 9 + [False] * 6
    order = data.mix_image_text(has_image, seed=3)
    assert sorted(order) == list(range(15))
    assert [has_image[i] for i in order] == [True, True, False] * 4 + [True, False, False]
    assert order != data.mix_image_text(has_image, seed=4)


def test_token_budget_batches_cover_everything_within_budget():
    lengths = [int(50 + 950 * (i * 7919 % 101) / 101) for i in range(2000)]
    batches = batching.token_budget_batches(lengths, 4096, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(2000))
    assert all(max(lengths[i] for i in b) * len(b) <= 4096 for b in batches)
    assert batching.padding_waste(lengths, batches) <= 0.10


def vl_rewardbench_lengths(answers_per_row=None):
    """Token lengths of VL-RewardBench question + answer under the reward template, with the real InternLM2 tokenizer
    (images are not shipped, so text tokens only): every answer of a row, or its first `answers_per_row`."""
    if not REAL_TOKENIZER.is_file():
        pytest.skip("shared assets not found")
    tok = data.Tokenizer(REAL_TOKENIZER)
    rows = data.read_rows(ASSETS / "preference" / "vl_rewardbench_data.jsonl")
    return [len(tok.encode(data.reward_template([{"role": "user", "content": r["query"]},
                                                 {"role": "assistant", "content": a}])))
            for r in rows for a in r["response"][:answers_per_row]]


def test_padding_waste_on_real_lengths():
    lengths = vl_rewardbench_lengths()
    batches = batching.token_budget_batches(lengths, 8192, seed=0)
    assert batching.padding_waste(lengths, batches) <= 0.10


def test_a_random_step_packs_with_little_padding():
    """The training loop's packing: a random step's share (16 samples) cut into micro-batches of the world's 1024
    tokens. Filling each micro-batch to the budget wastes 16% here; cutting where it is cheapest stays <= 10%
    without falling back to one sample per forward."""
    lengths = vl_rewardbench_lengths(answers_per_row=1)
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    real = padded = calls = 0
    for at in range(0, len(order) - 31, 32):
        mine = sorted(order[at:at + 32], key=lambda i: lengths[i])[0::2]
        micro = batching.token_budget_batches([lengths[i] for i in mine], 1024, shuffle=False)
        assert sorted(i for b in micro for i in b) == list(range(16))
        assert all(len(b) == 1 or max(lengths[mine[i]] for i in b) * len(b) <= 1024 for b in micro)
        real += sum(lengths[i] for i in mine)
        padded += sum(max(lengths[mine[i]] for i in b) * len(b) for b in micro)
        calls += len(micro)
    assert 1 - real / padded <= 0.10 and calls / (len(order) // 32) <= 10


def test_cheapest_cuts_equal_brute_force():
    """The micro-batch cuts are the cheapest of all contiguous splits within the budget (every split enumerated)."""
    import itertools
    rng = random.Random(0)
    for _ in range(200):
        n, budget, overhead = rng.randint(1, 9), rng.choice([64, 100, 256]), rng.choice([0, 8, 32])
        lengths = sorted(rng.randint(5, 120) for _ in range(n))
        cost = lambda spans: sum((j - i) * lengths[j - 1] + overhead for i, j in spans)  # noqa: E731
        best = math.inf
        for bits in itertools.product([0, 1], repeat=n - 1):
            ends = [k + 1 for k, b in enumerate(bits) if b] + [n]
            spans = list(zip([0] + ends[:-1], ends))
            if all(j - i == 1 or (j - i) * lengths[j - 1] <= budget for i, j in spans):
                best = min(best, cost(spans))
        spans = batching._cheapest_cuts(lengths, budget, overhead)
        assert [i for s in spans for i in range(*s)] == list(range(n)) and cost(spans) == best


def test_bad_data_names_file_and_row(tmp_path):
    p = tmp_path / "pairs.jsonl"
    good = {"conversations_a": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}],
            "conversations_b": [{"from": "human", "value": "q"}, {"from": "bot", "value": "b"}]}
    p.write_text(json.dumps(good) + "\n" + '{"conversations_a": [\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: malformed JSON"):
        data.read_preference(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps({"id": 7, "conversations_a": []}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl row 2 \(id 7\): expected 'conversations_a'"):
        data.read_preference(p)
    p.write_text(json.dumps(dict(good, image="missing.png")) + "\n")
    with pytest.raises(FileNotFoundError, match=r"pairs.jsonl row 1: image not found: .*missing.png"):
        data.read_preference(p)
    p.write_text(json.dumps({"conversations_a": [{"value": "x"}], "conversations_b": []}) + "\n")
    with pytest.raises(ValueError, match="row 1.*'from' and a string 'value'"):
        data.read_preference(p)


def test_readers_take_every_json_shape_and_reject_bad_rows_early(tmp_path):
    """A BOM, a single pretty-printed object and JSONL all read; an empty or null image, a placeholder count that
    does not match the images, and turns out of order fail when the file is read, naming file and row."""
    from PIL import Image
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    pair = {"id": "p", "image": "a.png", "conversations_a": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}],
            "conversations_b": [{"from": "human", "value": "q"}, {"from": "bot", "value": "b"}]}
    p = tmp_path / "pairs.json"
    p.write_text("\ufeff" + json.dumps([pair]), encoding="utf-8")
    assert data.read_preference(p)[0]["images"] == [str(tmp_path / "a.png")]
    p.write_text(json.dumps(pair, indent=2))
    assert len(data.read_preference(p)) == 1
    p.write_text(json.dumps(pair) + "\n" + json.dumps(pair) + "\n")
    assert len(data.read_preference(p)) == 2
    p.write_text(json.dumps([pair, dict(pair, id="q", image=[])]))
    assert data.read_preference(p)[1]["images"] == []
    for image, msg in (("", "'image' must be a path"), (None, "'image' must be a path"),
                       (["a.png", "a.png"], r"the text has 0 <ImageHere> placeholder\(s\) but 2 image\(s\)")):
        p.write_text(json.dumps([pair, dict(pair, id="q", image=image)]))
        with pytest.raises(ValueError, match=rf"pairs.json row 2 \(id 'q'\): {msg}"):
            data.read_preference(p)
    s = tmp_path / "sft.jsonl"
    turns = [{"from": "user", "value": "<ImageHere>What colour?"}, {"from": "assistant", "value": "Red."},
             {"from": "user", "value": "And the shape?"}, {"from": "assistant", "value": "A square."}]
    s.write_text(json.dumps({"image": "a.png", "conversations": turns}) + "\n"
                 + json.dumps({"conversations": turns[:1] + turns[2:]}) + "\n")
    with pytest.raises(ValueError, match=r"sft.jsonl row 2: expected user and assistant turns in alternation"):
        data.read_sft(s)
    s.write_text(json.dumps({"image": "a.png", "conversations": turns}) + "\n")
    prompt = data.sft_prompt(data.read_sft(s)[0])  # earlier turns are the history, with the image placeholder
    assert prompt == data.chat_prompt("And the shape?", [("<ImageHere>What colour?", "Red.")])
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "mix.txt").write_text("sft.jsonl 0.002\nempty.json 1\n")
    with pytest.raises(ValueError, match=r"mix.txt:2: empty.json holds no rows"):
        data.read_mixture(tmp_path / "mix.txt", reader=data.read_sft)
    (tmp_path / "mix.txt").write_text("sft.jsonl 0.003\n")
    assert len(data.read_mixture(tmp_path / "mix.txt", reader=data.read_sft)) == 3


def test_trim_metrics_drops_a_line_cut_by_a_kill(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1}\n{"step": 2}\n{"step": 2, "phase": "start"}\n{"step": 3}\n{"step": 4, "lo')
    common.trim_metrics(m, 2)   # a line logged at the start of step 2 + 1 is logged again when it is re-run
    assert m.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_official_example_reads(tmp_path):
    if not (ASSETS / "ixc_reward" / "example.json").is_file():
        pytest.skip("shared assets not found")
    pairs = data.read_preference(ASSETS / "ixc_reward" / "example.json")
    assert len(pairs) == 1 and pairs[0]["images"][0].endswith("example.png")
    assert pairs[0]["chosen"][0]["role"] == "user" and pairs[0]["chosen"][1]["role"] == "assistant"


def test_nan_loss_stops_without_saving_nan(world, tmp_path, monkeypatch):
    last = {"step": -1}
    real_lr_at, real_bt_loss = common.lr_at, train.bt_loss

    def lr_at(step, *a):  # called as each step ends: the step index the next losses belong to is step + 1
        last["step"] = max(last["step"], step)
        return real_lr_at(step, *a)

    def flaky(c, r, center_coef=0.0):  # every micro-batch of the 4th step (index 3) and after
        return real_bt_loss(c, r, center_coef) * (float("nan") if last["step"] >= 2 else 1.0)
    monkeypatch.setattr(common, "lr_at", lr_at)
    monkeypatch.setattr(train, "bt_loss", flaky)
    with pytest.raises(SystemExit, match=r"loss is nan at step 4.*last good checkpoint is .* \(step 2\)"):
        run(world, tmp_path / "nan", "--steps", "6")
    saved = load_file(str(tmp_path / "nan" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_sigkill_then_resume_is_bit_identical(world, tmp_path):
    """A run killed with SIGKILL mid-training and resumed ends with the weights of an uninterrupted run."""
    import random
    import signal
    import time
    args = [sys.executable, "train.py", "--stage", "rm", "--world-dir", str(world / "world"), "--init",
            str(world / "sft"), "--batch", "8", "--steps", "10", "--save-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(args + ["--out", str(tmp_path / "straight")], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=300)
    kill_at = random.Random().randint(2, 7)
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _saved_step(tmp_path / "killed") < kill_at:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _saved_step(tmp_path / "killed") < 10, "the run finished before it could be killed"
    subprocess.run(args + ["--out", str(tmp_path / "killed"), "--resume"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _saved_step(out):
    from safetensors import safe_open
    try:
        with safe_open(str(out / "resume.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["state"])["step"]
    except Exception:
        return -1


def test_cli_errors_are_one_paragraph(world, tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--stage", "rm", "--out", str(tmp_path / "x"), "--init",
                        str(tmp_path / "no-such-ckpt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "checkpoint directory not found" in r.stderr and "no-such-ckpt" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations_a": [], "conversations_b": []}\n{oops\n')
    r = subprocess.run([sys.executable, "train.py", "--stage", "rm", "--out", str(tmp_path / "y"), "--init",
                        str(world / "sft"), "--data", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "bad.jsonl:2: malformed JSON row" in r.stderr


def test_run_cli_one_line_for_the_user_a_traceback_for_a_bug(capsys, monkeypatch):
    """What a user can fix (a missing file, a malformed row) ends in one line and status 1; a bug in our code, a
    shape error in torch (RuntimeError) or a ValueError torch raises itself, keeps its traceback."""
    monkeypatch.delenv("IXC_DEBUG", raising=False)
    for mistake, line in ((lambda: data.read_rows("no/such/rows.json"), "data file not found: no/such/rows.json"),
                          (lambda: data.from_official([{"from": "human"}]), "message 0 must have 'from'")):
        with pytest.raises(SystemExit) as e:
            data.run_cli(mistake)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: " + line) and err.count("\n") == 1
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        data.run_cli(lambda: torch.zeros(2, 3) @ torch.zeros(2, 3))
    with pytest.raises(ValueError, match="Expected input batch_size"):
        data.run_cli(lambda: torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(KeyError):
        data.run_cli(lambda: {}["missing"])
    monkeypatch.setenv("IXC_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        data.run_cli(lambda: data.read_rows("no/such/rows.json"))


def test_video_without_decoder_names_the_package(tmp_path, monkeypatch):
    import vision
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"clip.mp4 needs the optional package PyAV: pip install av"):
        vision.load_video_frames(video)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
def test_one_failing_rank_ends_the_job_promptly(world, tmp_path):
    """Two processes; one pair's image is corrupt, so only the rank whose shard holds it fails, while the other waits
    in the gradient all-reduce. torchrun must stop the job quickly and show the failing rank's message."""
    import shutil
    import time
    rows = json.loads((world / "world" / "pref_train.json").read_text())[:8]
    (tmp_path / "images").mkdir()
    for r in rows:
        if "image" in r:
            shutil.copy(world / "world" / r["image"], tmp_path / r["image"])
    bad = next(r for r in rows if "image" in r)
    png = (tmp_path / bad["image"]).read_bytes()
    (tmp_path / bad["image"]).write_bytes(png[:len(png) // 2])  # header intact, pixels cut: fails when decoded
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", "--stage", "rm", "--init", str(world / "sft"), "--data", str(tmp_path / "pairs.json"),
                        "--out", str(tmp_path / "out"), "--batch", "2", "--steps", "4", "--lr", "1e-4"],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and time.time() - t0 < 120
    assert "cannot read image" in r.stderr and Path(bad["image"]).name in r.stderr


def test_stale_world_is_rewritten(tmp_path, monkeypatch):
    """A cached world written by another world version (here: the version-1 world.json layout) is regenerated."""
    real = store.write_world
    monkeypatch.setattr(store, "write_world",
                        lambda out, seed, **kw: real(out, seed, n_sft=16, n_pref=16, n_heldout=8, n_sft_easy=8))
    wd = tmp_path / "world"
    wd.mkdir()
    (wd / "world.json").write_text(json.dumps({"sft_train": "sft_train.json"}))
    files = store.ensure_world(wd)
    assert json.loads((wd / "world.json").read_text())["version"] == WORLD_VERSION
    assert all(p.is_file() for p in files.values()) and len(json.loads(files["sft_train"].read_text())) == 16
    (wd / ".lock").unlink()
    monkeypatch.setattr(store, "write_world", lambda *a: pytest.fail("a current world is rewritten"))
    assert store.ensure_world(wd) == files and not (wd / ".lock").exists()  # only read: a read-only cache works


@pytest.mark.skipif(sys.platform != "linux", reason="a POSIX file lock")
def test_world_is_written_once_when_ranks_race(tmp_path, monkeypatch):
    """Two callers at once (as torchrun's ranks): one writes the world, the other waits for it and reads it."""
    import threading
    import time
    real, calls = store.write_world, []

    def slow_small(out, seed, **kw):
        calls.append(out)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one writes
        return real(out, seed, n_sft=16, n_pref=16, n_heldout=8, n_sft_easy=8)
    monkeypatch.setattr(store, "write_world", slow_small)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.ensure_world(tmp_path / "world")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert len(json.loads(results[1]["pref_train"].read_text())) == 16


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_ppo_two_processes(world, tmp_path, algo):
    """torchrun --nproc_per_node 2 (gloo, DDP): the ranks' shares of a mini-batch pack into different numbers of
    micro-batches (sampled lengths, a small token budget), and each rank still all-reduces once per mini-batch;
    the ranks end with identical weights (ppo.train checks at every save: a policy forward that bypassed DDP
    once left each rank training its own copy); the process group is torn down cleanly."""
    rm = tmp_path / "rm"
    run(world, rm, "--steps", "1")
    launch(["--stage", "ppo", "--algo", algo, "--world-dir", str(world / "world"), "--init", str(world / "sft"),
            "--rm", str(rm), "--steps", "2", "--batch", "8", "--rloo-k", "2", "--max-new-tokens", "12",
            "--token-budget", "160", "--out", str(tmp_path / "out")], procs=2)
    assert "accuracy_after" in json.loads((tmp_path / "out" / "summary.json").read_text())


def test_ppo_stage_writes_summary_and_resumes_exactly(world, tmp_path):
    """The real PPO entry point on the tiny world: the summary holds what the issue asks for, and a run stopped after
    one iteration and resumed ends with the same policy and critic as an uninterrupted one (sampling is seeded per
    iteration, the optimizers and RNGs are restored)."""
    rm = tmp_path / "rm"
    run(world, rm, "--steps", "2")

    def ppo(out, *extra):
        return run(world, out, "--rm", str(rm), "--steps", "2", "--batch", "4", "--max-new-tokens", "6",
                   "--save-every", "1", *extra, stage="ppo")

    summary = ppo(tmp_path / "a")
    assert {"accuracy_before", "accuracy_after", "accuracy_before_by_kind", "accuracy_after_by_kind", "kl"} <= summary.keys()
    assert ppo(tmp_path / "b", "--stop-after", "1") is None
    ppo(tmp_path / "b", "--resume")
    for sub in ("", "critic"):
        a = load_file(str(tmp_path / "a" / sub / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / sub / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    rloo = run(world, tmp_path / "rloo", "--rm", str(rm), "--steps", "1", "--batch", "4", "--max-new-tokens", "6",
               "--algo", "rloo", stage="ppo")
    assert "accuracy_after" in rloo


@pytest.fixture(scope="module")
def ppo_rm(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_rm") / "rm"
    run(world, out, "--steps", "1")
    return out


def run_ppo(world, rm, out, *extra, procs=1, script="train.py"):
    """2 PPO iterations on a global batch of 8 prompts in a fresh process or under torchrun (gloo); the small token
    budget packs each rank's share of a mini-batch into several micro-batches."""
    launch(["--stage", "ppo", "--world-dir", str(world / "world"), "--init", str(world / "sft"), "--rm", str(rm),
            "--steps", "2", "--batch", "8", "--rloo-k", "2", "--max-new-tokens", "12", "--token-budget", "160",
            "--save-every", "2", "--out", str(out), *extra], procs, script)
    return out


def metrics(out):
    """The iterations' lines of a PPO run's log (not the held-out checks logged at an iteration's start)."""
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "phase" not in m]


@pytest.fixture(scope="module")
def ppo_runs(world, ppo_rm, tmp_path_factory):
    """algo -> (a 1-process run, a 2-process --fsdp run) of run_ppo, each made once, on first use."""
    made = {}

    def get(algo):
        if algo not in made:
            d = tmp_path_factory.mktemp(algo)
            made[algo] = (run_ppo(world, ppo_rm, d / "one", "--algo", algo),
                          run_ppo(world, ppo_rm, d / "fsdp", "--algo", algo, "--fsdp", procs=2))
        return made[algo]
    return get


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_ppo_fsdp_two_processes_equal_one(world, ppo_runs, algo):
    """--stage ppo --fsdp on 2 processes (FSDP2, gloo) with the global batch of a 1-process run: each response comes
    from its own generator and mini-batches are cut from the global batch, so the two runs sample the same
    responses and take the same steps. Policy and critic weights after 2 iterations, and every logged statistic but
    the timings, agree up to reduction order."""
    one, fsdp = ppo_runs(algo)
    assert json.loads((fsdp / "summary.json").read_text())["fsdp"] is True
    for sub in ("", "critic") if algo == "ppo" else ("",):
        assert_same_weights(one / sub, fsdp / sub)
    w, start = "model.layers.0.attention.wqkv.weight", load_file(str(world / "sft" / "model.safetensors"))
    assert not torch.equal(load_file(str(fsdp / "model.safetensors"))[w], start[w])  # it trained
    for a, b in zip(metrics(one), metrics(fsdp), strict=True):
        assert a.keys() == b.keys()
        for k in a.keys() - {"tokens_per_s", "rollout_s"}:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6, nan_ok=True), k


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
def test_ppo_fsdp_resume_is_identical(world, ppo_rm, ppo_runs, tmp_path):
    """An --fsdp PPO run stopped after one iteration and resumed ends with the policy and critic of the
    uninterrupted --fsdp run, bit for bit (shards re-made from the whole saved tensors, samplers seeded by step)."""
    fsdp = ppo_runs("ppo")[1]
    run_ppo(world, ppo_rm, tmp_path / "b", "--fsdp", "--save-every", "1", "--stop-after", "1", procs=2)
    run_ppo(world, ppo_rm, tmp_path / "b", "--fsdp", "--save-every", "1", "--resume", procs=2)
    for sub in ("", "critic"):
        assert_same_weights(fsdp / sub, tmp_path / "b" / sub, exact=True)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
def test_ppo_fsdp_ranks_stopping_apart(world, ppo_rm, tmp_path):
    """Rank 0's responses all stop at their first token, rank 1's run to --max-new-tokens (tests/forced_stops.py
    forces the sampled tokens per rank): the ranks' rollouts and micro-batch counts differ, and the run still
    completes (a rank left waiting in a collective would hang until launch's timeout). With --autocast bf16, so
    that the path CUDA takes by default (frozen models and the sampling copy in bf16) runs too."""
    out = run_ppo(world, ppo_rm, tmp_path / "out", "--fsdp", "--autocast", "bf16", procs=2,
                  script="tests/forced_stops.py")
    for m in metrics(out):
        assert m["eos_rate"] == 0.5 and m["response_length"] == (1 + 12) / 2
    assert "accuracy_after" in json.loads((out / "summary.json").read_text())


def test_a_flag_a_stage_does_not_read_is_refused(world, tmp_path):
    """Each stage's settings are its own: a flag it would ignore is an error naming the flag, not a silent no-op."""
    for stage, extra, flag in (("sft", ["--head", "mlp"], "--head"), ("ppo", ["--max-len-ratio", "3"], "--max-len-ratio"),
                               ("rm", ["--kl-coef", "0.1"], "--kl-coef"), ("rm", ["--truth"], "--truth"),
                               ("ppo", ["--center-coef", "0.01"], "--center-coef"),
                               ("sft", ["--init", str(world / "sft"), "--layers", "3"], "--layers"),
                               ("sft", ["--init", str(world / "sft"), "--tokenizer", "t.model"], "--tokenizer")):
        r = subprocess.run([sys.executable, "train.py", "--stage", stage, "--out", str(tmp_path / stage), *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"--stage {stage} does not use {flag}" in r.stderr, r.stderr
        assert not (tmp_path / stage).exists()
    a = train.parse_args(["--stage", "ppo", "--out", "x", "--rm", "r"])   # the world's settings for the stage
    assert (a.lr, a.steps, a.batch, a.eval_every, a.kl_coef) == (1e-4, 120, 48, 20, 0.1)
    with pytest.raises(SystemExit, match="--center-coef must be >= 0"):
        train.parse_args(["--stage", "rm", "--out", "x", "--center-coef", "-0.1"])
    with pytest.raises(SystemExit):   # the world's own models are built by the world, not by the launcher
        train.parse_args(["--stage", "sft", "--out", "x", "--data", "d.json", "--truth"])
    a = train.parse_args(["--stage", "ppo", "--out", "x", "--rm", "r", "--data", "d.json"])   # the official recipe
    assert (a.lr, a.steps, a.batch, a.eval_every, a.kl_coef) == (1e-6, 100, 16, 0, 0.05)
    a = train.parse_args(["--stage", "rm", "--data", "d.json"])
    assert (a.lr, a.batch, a.weight_decay, a.beta2, a.warmup, a.clip, a.hd_num, a.max_length) == \
        (1e-5, 16, 0.1, 0.95, 0.01, 1.0, 9, 8192)
    assert a.out == "runs/rm" and not hasattr(a, "kl_coef") and not hasattr(train.parse_args(["--stage", "ppo", "--rm",
                                                                                              "r"]), "head")
    r = subprocess.run([sys.executable, "train.py", "--stage", "sft", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--freeze-vision" in r.stdout and "--head" not in r.stdout and "--rm" not in r.stdout
    assert "--lr LR" in r.stdout and "(default: 0.001 on the built-in world, 1e-05 with --data)" in \
        " ".join(r.stdout.split())   # the world's SFT learning rate and the recipe's, shown


def test_ppo_finds_the_reward_model_the_rm_stage_writes(tmp_path, monkeypatch):
    """On the built-in world, --stage ppo reads runs/rm, where --stage rm writes by default; without it, one line
    names the command that makes it. With --data the reward model is named with --rm (ppo.train asks for it)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"no reward model in runs/rm; train it first: torchrun --standalone "
                                         r"--nproc_per_node 2 train.py --stage rm"):
        train.parse_args(["--stage", "ppo"])
    (tmp_path / "runs" / "rm").mkdir(parents=True)
    (tmp_path / "runs" / "rm" / "config.json").write_text("{}")
    a = train.parse_args(["--stage", "ppo"])
    assert a.rm == ["runs/rm"] and a.out == "runs/ppo"
    assert train.parse_args(["--stage", "ppo", "--rm", "x", "y"]).rm == ["x", "y"]
    assert train.parse_args(["--stage", "ppo", "--data", "d.json"]).rm is None


def test_warmup_rows_of_a_data_file_open_the_first_epoch(tmp_path):
    """The world's SFT set opens epoch 0 with its warm-up rows; a --data file's rows marked "warmup": true do too
    (read_sft keeps the key), and later epochs are shuffled whole."""
    rows = [{"id": i, "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
             **({"warmup": True} if i % 4 == 3 else {})} for i in range(40)]
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    samples = data.read_sft(tmp_path / "sft.json")
    warm = {i for i, s in enumerate(samples) if s.get("warmup")}
    assert warm == {i for i in range(40) if i % 4 == 3}
    first = train.sft_order(samples, seed=0, epoch=0)
    assert sorted(first) == list(range(40)) and set(first[:10]) == warm
    assert first[:10] != sorted(warm) and first[10:] != sorted(set(range(40)) - warm)   # each group shuffled
    later = train.sft_order(samples, seed=0, epoch=1)
    assert sorted(later) == list(range(40)) and set(later[:10]) != warm
