"""The PPO memory model (bench.ppo_memory) against measurement: one decoder layer's saved activations against the
tensors autograd itself keeps, and the modelled peak against the measured peak tensor memory of real PPO runs of
the world's tiny models on 1 and 2 processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import train
from world import WORLD_SFT, scene
from conftest import ROOT
from model import Config, InternLM2Model, init_weights
from test_train import world  # noqa: F401  (the small-world fixture)


def saved_by_one_layer(D, I, H, KV, r, L, image_fraction, B=2):
    """Bytes of the tensors autograd saves for the backward of one decoder layer (fp32, rows of L tokens, the first
    `image_fraction` of each row image tokens, one row left-padded), each storage once, parameters excluded."""
    m = init_weights(InternLM2Model(Config(hidden_size=D, intermediate_size=I, num_hidden_layers=1,
                                           num_attention_heads=H, num_key_value_heads=KV, plora_rank=r,
                                           vocab_size=64))).train()
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    x = torch.randn(B, L, D, requires_grad=True)
    im_mask = torch.zeros(B, L, dtype=torch.bool)
    im_mask[:, :int(image_fraction * L)] = True
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, :3] = 0
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x, im_mask, attention_mask)
    return sum(saved.values())


@pytest.mark.parametrize("shape", [(128, 352, 4, 2, 16), (256, 704, 8, 2, 8)])
def test_layer_activations_are_what_autograd_saves(shape):
    """layer_activation_bytes (fp32) is exactly what autograd keeps, once the attention kernel's float mask
    (B L^2 per layer) and what the layers share (RoPE tables: 2 head_dim per token) are added, text and image tokens alike: PLoRA runs dense under any image mask, even one with no image."""
    D, I, H, KV, r = shape
    hd = D // H
    per_token, per_plora_token = bench.layer_activation_bytes(D, I, H, KV * hd, r, autocast=False)
    for L, image_fraction in ((64, 0.0), (96, 0.5)):
        tokens = 2 * L
        want = tokens * (per_token + per_plora_token) + 2 * L * L * 4 + tokens * 2 * hd * 4
        assert saved_by_one_layer(D, I, H, KV, r, L, image_fraction) == want


@pytest.fixture(scope="module")
def rm_of_world_policy(world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("rm6") / "rm"
    train.main(["--stage", "rm", "--out", str(out), "--world-dir", str(world / "world"), "--init",
                str(WORLD_SFT), "--batch", "8", "--steps", "1", "--save-every", "1"])
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
@pytest.mark.parametrize("procs, extra", [(1, []), (2, ["--fsdp"]), (1, ["--autocast", "bf16"])])
def test_modelled_peak_is_within_20_percent_of_measured(world, rm_of_world_policy, tmp_path, procs, extra):  # noqa: F811
    """PPO on the world's shipped policy (and a reward model from it) with the whole share in one micro-batch:
    every rank's peak tensor memory (bench.peak_tensor_bytes) is within 20% of ppo_memory's for the run's settings
    and its longest prompt. Responses are cut at 6 tokens, shorter than the policy's answers, so that they are as
    long as the model assumes."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    # the model pads every prompt to the longest: plain image questions (no instruction, no preface, one turn) are
    # all about as long, as the model assumes; their images are the world's, read from --out's parent
    rows = [r for r in json.loads((world / "world" / "sft_train.json").read_text()) if "image" in r
            and "instruction" not in r and "history" not in r
            and not r["conversations"][0]["value"].startswith(scene.PREFACE)]
    prompts = world / "world" / "plain_prompts.json"
    if not prompts.exists():
        prompts.write_text(json.dumps(rows))
    r = subprocess.run([sys.executable, *torchrun, "bench.py", "--ppo-memory-check", "--stage", "ppo",
                        "--data", str(prompts), "--init", str(WORLD_SFT),
                        "--rm", str(rm_of_world_policy), "--steps", "2", "--batch", "8", "--max-new-tokens", "6",
                        "--token-budget", "4096", "--mini-batches", "1", "--save-every", "2",
                        "--out", str(tmp_path / "out"), *extra],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line.split(" ", 1)[1]) for line in r.stdout.splitlines()
             if line.startswith("ppo_memory_check ")]
    assert sorted(line["rank"] for line in lines) == list(range(procs))
    for line in lines:
        assert line["settings"]["max_new_tokens"] == 6 and line["settings"]["image_tokens"] > 0
        assert 0.8 <= line["modelled"] / line["measured"] <= 1.2, line
