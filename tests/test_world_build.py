"""The world's own models (python -m world ...): a from-scratch model has the shape asked for and sin-cos ViT
positions, the vision pretraining names every cell, the SFT data file is the world's SFT set as train.py reads it,
a build's init checkpoint trains with train.py --init, and deepen's new layers start as the identity."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import train
from conftest import ROOT
from model import InternLMXComposer2, add_layers
from reward import RewardModel
from test_train import world  # noqa: F401  (the small-world fixture)
from vision import sincos_position_embedding
from world import WORLD_SFT, build, scene, weaker

TINY = ["--layers", "2", "--width", "32", "--ffn", "64"]


def built(world, out, *extra, command="build-policy"):  # noqa: F811
    """A build's arguments on the small world, as `python -m world` parses them."""
    return build.parse_args([command, "--out", str(out), "--world-dir", str(world / "world"), *extra])


def model_of(a):
    """The from-scratch model a build starts from (the world's tokenizer unless the build names one)."""
    return build.init_model(a.tokenizer or a.world_dir / "tokenizer.model", a.layers, a.width, a.ffn, a.vit_pos,
                            a.seed)


def test_from_scratch_vit_starts_with_sincos_positions(world, tmp_path):  # noqa: F811
    """The table is MAE's 2-D sin-cos (dot products depend only on the offset along each axis); a from-scratch
    model starts with it at --vit-pos amplitude, and --vit-pos 0 keeps CLIP's N(0, 0.02) init."""
    t = sincos_position_embedding(4, 16).double()
    assert t.shape == (17, 16) and not t[0].any()
    g = t[1:].reshape(4, 4, 16)
    assert torch.allclose(g[0, 0] @ g[1, 0], g[2, 3] @ g[3, 3]) and torch.allclose(g[1, 1] @ g[1, 3], g[3, 0] @ g[3, 2])
    assert (torch.cdist(t[1:], t[1:]) + torch.eye(16)).min() > 0.1          # every patch position distinct
    for amp in (3.0, 0.0):
        model = model_of(built(world, tmp_path, "--vit-pos", str(amp)))
        table = model.vit.vision_tower.vision_model.embeddings.position_embedding.weight
        if amp:
            assert torch.equal(table, sincos_position_embedding(model.cfg.vision.grid, table.shape[1], amp))
        else:
            assert table.std() < 0.05


def test_from_scratch_model_shape_flags(world, tmp_path):  # noqa: F811
    """--layers / --width / --ffn shape the from-scratch world model; build-policy's defaults are the shipped
    policy's, build-judge's the shipped judge's depth."""
    shipped = json.loads((WORLD_SFT / "config.json").read_text())
    judge = json.loads((ROOT / "checkpoints" / "world-judge" / "config.json").read_text())
    for cmd, flags, want in [
            ("build-policy", [], (shipped["num_hidden_layers"], shipped["hidden_size"], shipped["intermediate_size"])),
            ("build-judge", [], (judge["num_hidden_layers"], judge["hidden_size"], judge["intermediate_size"])),
            ("build-policy", ["--layers", "6", "--width", "96", "--ffn", "256"], (6, 96, 256)),
            ("build-policy", ["--layers", "3", "--width", "48", "--ffn", "96"], (3, 48, 96))]:
        model = model_of(built(world, tmp_path, *flags, command=cmd))
        assert (len(model.model.layers), model.cfg.hidden_size, model.cfg.intermediate_size) == want
        assert model.model.layers[0].feed_forward.w1.weight.shape == (want[2], want[1])


def test_sft_data_is_the_worlds_sft_set(world, tmp_path):  # noqa: F811
    """The file a build trains on reads back (data.read_sft) as the world's SFT set, in what train.py reads of a
    sample (conversation, images, warm-up mark, ground truth): the single-object warm-up rows first, marked, then
    the rest; with the judge's truth, exactly the weaker model's failures replaced."""
    files = {k: world / "world" / f"{k}.json" for k in ("sft_train", "sft_easy", "sft_errors")}
    want = [dict(s, warmup=True) for s in data.read_sft(files["sft_easy"])] + data.read_sft(files["sft_train"])
    errors = json.loads(files["sft_errors"].read_text())
    read = lambda r: {k: r.get(k) for k in ("id", "conversation", "images", "warmup", *weaker.GT_KEYS)}  # noqa: E731
    for truth, rows in ((False, want), (True, weaker.truthful(want, errors))):
        got = data.read_sft(build.write_sft_data(tmp_path / f"sft_{truth}.json", files, truth))
        assert [read(r) for r in got] == [read(r) for r in rows]
    assert sum(r.get("warmup", False) for r in got) == len(data.read_sft(files["sft_easy"])) > 0


def test_vision_pretraining_names_every_cell_and_sft_keeps_the_tower(world, tmp_path):  # noqa: F811
    """--vision-steps: ViT and vision_proj learn each cell's colour and shape (scored where a cell holds an object,
    so that "empty" everywhere scores 0) and its place from that cell's merged token; SFT then trains the decoder
    around the pretrained tower, frozen."""
    assert scene.cell_labels([["green", "square", 1, 0], ["yellow", "circle", 3, 3]]) == (
        [0] * 4 + [2] + [0] * 10 + [4], [0] * 4 + [2] + [0] * 10 + [1])
    a = built(world, tmp_path / "a")   # the shipped policy's shape: a narrower tower names cells less well
    acc = build.pretrain_vision(model_of(a), 150, seed=0)
    assert min(acc.values()) > 0.9, acc
    cmd = build.main(["build-policy", "--out", str(tmp_path / "b"), "--world-dir", str(world / "world"),
                      "--vision-steps", "3", "--steps", "2", "--init-only"])
    assert cmd[cmd.index("--freeze-vision") + 1] == "yes" and "--train-transform" not in cmd
    train.main(cmd[cmd.index("--stage"):])
    pretrained = load_file(str(tmp_path / "b" / "init" / "model.safetensors"))
    scratch = model_of(built(world, tmp_path / "c")).state_dict()
    after = load_file(str(tmp_path / "b" / "model.safetensors"))
    tower = [k for k in after if k.startswith(("vit.", "vision_proj."))]
    assert tower and all(torch.equal(pretrained[k], after[k]) for k in tower)     # pretrained, then frozen
    assert not all(torch.equal(pretrained[k], scratch[k]) for k in tower)        # the flag did pretrain it
    key = "model.layers.0.attention.wqkv.weight"
    assert not torch.equal(pretrained[key], after[key])


def test_build_command_writes_a_checkpoint_train_py_reads(world, tmp_path):  # noqa: F811
    """`python -m world build-policy --init-only` writes init/ and sft.json and prints the SFT command; that
    command, run as printed, trains the from-scratch model, its vision tower with it."""
    out = tmp_path / "policy"
    r = subprocess.run([sys.executable, "-m", "world", "build-policy", "--out", str(out), "--world-dir",
                        str(world / "world"), *TINY, "--steps", "2", "--nproc", "1", "--init-only"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip().splitlines()[-1].split()
    assert cmd[:2] == ["torchrun", "--standalone"] and cmd[cmd.index("--init") + 1] == str(out / "init")
    init = InternLMXComposer2.from_pretrained(out / "init")
    assert len(init.model.layers) == 2 and (out / "init" / "tokenizer.model").read_bytes() == \
        (world / "world" / "tokenizer.model").read_bytes()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd[1:]], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "heldout_accuracy" in summary
    before, after = load_file(str(out / "init" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["vit.vision_tower.vision_model.embeddings.patch_embedding.weight"],
                           after["vit.vision_tower.vision_model.embeddings.patch_embedding.weight"])


def test_deepened_layers_start_as_the_identity_then_train(world, tmp_path):  # noqa: F811
    """deepen: the deepened trunk computes what the trunk did (its new residual branches start at zero), a reward
    model started from it is the one stacking the layers at the rm stage made, and the rm stage trains and saves the
    new layers."""
    model = InternLMXComposer2.from_pretrained(world / "sft")
    x = torch.randn(2, 9, model.cfg.hidden_size)
    before = model.model(x)
    n = model.cfg.num_hidden_layers
    add_layers(model, 2, seed=1)
    assert len(model.model.layers) == model.cfg.num_hidden_layers == n + 2
    torch.testing.assert_close(model.model(x), before, rtol=0, atol=1e-6)
    build.main(["deepen", "--init", str(world / "sft"), "--add-layers", "2", "--out", str(tmp_path / "deep")])
    deep = InternLMXComposer2.from_pretrained(tmp_path / "deep")
    assert len(deep.model.layers) == n + 2
    torch.testing.assert_close(deep.model(x), before, rtol=0, atol=1e-6)
    rm = add_layers(RewardModel.from_pretrained(world / "sft", seed=0), 2, seed=0)   # train.py's --add-layers 2
    deep_rm = RewardModel.from_pretrained(tmp_path / "deep", seed=0).state_dict()
    assert rm.state_dict().keys() == deep_rm.keys()
    assert all(torch.equal(v, deep_rm[k]) for k, v in rm.state_dict().items())
    train.main(["--stage", "rm", "--out", str(tmp_path / "rm"), "--world-dir", str(world / "world"), "--init",
                str(tmp_path / "deep"), "--batch", "8", "--steps", "4", "--save-every", "2"])
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    after = load_file(str(tmp_path / "rm" / "model.safetensors"))
    assert cfg["num_hidden_layers"] == n + 2
    assert after[f"model.layers.{n + 1}.feed_forward.w2.weight"].abs().sum() > 0   # trained off its zero start
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            build.parse_args(["deepen", "--init", "x", "--add-layers", bad, "--out", "y"])
