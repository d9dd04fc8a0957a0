"""The world's own models, built from scratch as IXC-2.5 was before the paper starts from it: each command writes an
initial checkpoint (config.json, model.safetensors, tokenizer.model: what `train.py --init` reads) and the SFT data
file, then runs train.py's SFT stage on them, the settings that build the shipped checkpoints from scratch (the
command in their summary.json; the shipped bytes' own history is beside it).

    python -m world build-policy --out runs/policy   # the tiny policy: 4 layers, width 128 (checkpoints/world-sft)
    python -m world build-judge --out runs/judge     # the judge trunk (checkpoints/world-judge): 8 layers, the
                                                     # policy's tokenizer, a pretrained vision tower, right answers
    python -m world deepen --init checkpoints/world-judge --add-layers 2 --out runs/judge10   # +2 identity layers

With --init-only a build stops after writing DIR/init and DIR/sft.json and prints the train.py command it would run.
`python -m world arms | compare-arms` are the cleaning comparison's (world/cleaning.py).
"""
import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import Config, InternLMXComposer2, add_layers, init_weights
from vision import hd_transform, sincos_position_embedding, to_pixels
from world import COLOURS, GRID, IMG, ROOT, SHAPES, WORLD_CONFIG, WORLD_DIR, WORLD_SFT
from world.scene import cell_labels, cell_tokens, draw, sample_objects
from world.store import ensure_world
from world import cleaning

# train.py's SFT stage on the world: the tiny models learn at a far larger rate and smaller padded batches than the
# official recipe's 7B (lr 1e-5, 4096 tokens)
SFT = dict(lr=1e-3, batch=32, token_budget=1024, save_every=250)
POLICY = dict(layers=WORLD_CONFIG["num_hidden_layers"], width=WORLD_CONFIG["hidden_size"],
              ffn=WORLD_CONFIG["intermediate_size"], vit_pos=4.0, vision_steps=0, tokenizer=None, steps=6000,
              eval_every=0, truth=False)
# the judge: twice the policy's depth, its tokenizer (a reward model scores the policy's token ids), a vision tower
# pretrained to name each cell's colour, shape and place, and every SFT answer right (weaker.truthful)
JUDGE = dict(POLICY, layers=8, vision_steps=400, tokenizer=str(WORLD_SFT / "tokenizer.model"), steps=4000,
             eval_every=1000, truth=True)


def init_model(tokenizer, layers, width, ffn, vit_pos, seed):
    """The world's tiny model, from scratch: WORLD_CONFIG's shape with `layers` decoder layers of `width` (SwiGLU
    `ffn`), and the ViT's positions from a 2-D sin-cos table of amplitude `vit_pos` (0: CLIP's N(0, 0.02))."""
    tok = data.Tokenizer(tokenizer)
    shape = dict(num_hidden_layers=layers, hidden_size=width, intermediate_size=ffn)
    model = init_weights(InternLMXComposer2(Config(**{**WORLD_CONFIG, **shape}, vocab_size=tok.vocab_size)), seed)
    if vit_pos:
        table = model.vit.vision_tower.vision_model.embeddings.position_embedding.weight
        with torch.no_grad():
            table.copy_(sincos_position_embedding(model.cfg.vision.grid, model.cfg.vision.hidden_size, vit_pos))
    model.tokenizer = tok
    return model


def pretrain_vision(model, steps, seed, batch=32, lr=1e-3):
    """The world's stand-in for the CLIP pretraining IXC-2.5's ViT comes with: ViT and vision_proj learn to name each
    cell's colour, shape and place from its merged token of the local view (linear heads, dropped after), on freshly
    drawn training layouts. Trained through the LM loss alone, a tower's tokens carry colour many times more
    strongly than shape and lose their cell, and the decoder then cannot find the object a question names.
    Returns the heads' accuracy on the last batch (colour and shape: on the cells that hold an object)."""
    d = model.cfg.hidden_size
    heads = init_weights(nn.ModuleDict({"colour": nn.Linear(d, 1 + len(COLOURS)),
                                        "shape": nn.Linear(d, 1 + len(SHAPES)),
                                        "cell": nn.Linear(d, GRID * GRID)}), seed).to(model.device)
    opt = torch.optim.AdamW([*model.vit.parameters(), *model.vision_proj.parameters(), *heads.parameters()], lr=lr,
                            weight_decay=0.01)
    rng = np.random.default_rng([seed, 11])
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        layouts = [sample_objects(rng) for _ in range(batch)]
        pixels = [to_pixels(hd_transform(draw(objs), 1, crop=IMG)) for objs in layouts]
        colour, shape = (torch.tensor(x, device=model.device) for x in zip(*map(cell_labels, layouts)))
        tokens = torch.stack([cell_tokens(t) for t in model.encode_images(pixels)])
        target = {"colour": colour, "shape": shape,
                  "cell": torch.arange(GRID * GRID, device=model.device).expand(batch, -1)}
        logits = {k: heads[k](tokens) for k in heads}
        loss = sum(F.cross_entropy(logits[k].flatten(0, 1), target[k].flatten()) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hit = {k: logits[k].argmax(-1) == target[k] for k in heads}
        return {"colour": hit["colour"][shape > 0].float().mean().item(),
                "shape": hit["shape"][shape > 0].float().mean().item(), "cell": hit["cell"].float().mean().item()}


def write_sft_data(path, files, truth=False):
    """The world's SFT set as one file in the official format: the single-object warm-up rows first, marked
    "warmup" (train.py opens its first epoch with them), then the rest; with `truth`, every failure the weaker model
    wrote (sft_errors.json) replaced by the correct answer. Image paths are absolute, to the world's cache."""
    rows = [dict(r, warmup=True) for r in json.loads(Path(files["sft_easy"]).read_text())]
    rows += json.loads(Path(files["sft_train"]).read_text())
    if truth:
        fix = {e["id"]: e["correct_answer"] for e in json.loads(Path(files["sft_errors"]).read_text())}
        rows = [dict(r, conversations=r["conversations"][:-1] + [dict(r["conversations"][-1], value=fix[r["id"]])])
                if r["id"] in fix else r for r in rows]
    base = Path(files["sft_train"]).parent.resolve()
    rows = [dict(r, image=[str(base / im) for im in r["image"]]) if "image" in r else r for r in rows]
    data.atomic_write_text(path, json.dumps(rows, indent=1))
    return path


def sft_command(a, init, data_file, heldout):
    """train.py's SFT stage on the build's init checkpoint and data, writing the finished model to --out (run from
    the repository's root, as build does)."""
    freeze = "yes" if a.vision_steps else "no"   # a pretrained tower stays; an untrained one learns with the rest
    return ["torchrun", "--standalone", "--nproc_per_node", str(a.nproc), "train.py", "--stage", "sft",
            "--init", str(init), "--data", str(data_file), "--heldout", str(heldout), "--steps", str(a.steps),
            "--batch", str(SFT["batch"]), "--lr", str(SFT["lr"]), "--token-budget", str(SFT["token_budget"]),
            "--seed", str(a.seed), "--out", str(a.out), "--freeze-vision", freeze, "--eval-every",
            str(a.eval_every), "--save-every", str(SFT["save_every"])] + (["--resume"] if a.resume else [])


def build(a):
    """build-policy and build-judge: the init checkpoint and SFT data in --out, then the SFT stage (a subprocess)."""
    files = ensure_world(a.world_dir)
    init, data_file = a.out / "init", a.out / "sft.json"
    if not a.resume:
        model = init_model(a.tokenizer or files["sft_train"].parent / "tokenizer.model", a.layers, a.width, a.ffn,
                           a.vit_pos, a.seed)
        if a.vision_steps:
            acc = pretrain_vision(model, a.vision_steps, a.seed)
            print(f"pretrained the vision tower {a.vision_steps} steps: per-cell accuracy on its last batch " +
                  ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), file=sys.stderr)
        model.save_pretrained(init)
        write_sft_data(data_file, files, a.truth)
    cmd = sft_command(a, init, data_file, files["heldout_prompts"])
    print(shlex.join(cmd), flush=True)
    if not a.init_only:
        code = subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd[1:]], cwd=ROOT).returncode
        if code:
            raise SystemExit(f"error: the SFT stage exited with status {code}; rerun the build with --resume to "
                             f"continue it")
    return cmd


def deepen(a):
    """--add-layers fresh decoder layers on --init's trunk, each the identity at first (model.add_layers), written
    to --out for `train.py --stage rm --init`: depth after the trunk's own lookups, where checking a value needs it."""
    model = InternLMXComposer2.from_pretrained(a.init)
    add_layers(model, a.add_layers, a.seed)
    model.save_pretrained(a.out)
    print(f"wrote {a.out} ({model.cfg.num_hidden_layers} layers); train a reward model on it with\n    "
          f"torchrun --standalone --nproc_per_node 2 train.py --stage rm --init {a.out} --out runs/rm", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    for name, defaults, what in (("build-policy", POLICY, "the world's tiny policy, from scratch"),
                                 ("build-judge", JUDGE, "the judge trunk: deeper, pretrained tower, right answers")):
        b = sub.add_parser(name, help=what, description=what, allow_abbrev=False, formatter_class=data.HelpFormatter)
        b.add_argument("--out", type=Path, required=True, help="the finished model (init/ and sft.json inside)")
        b.add_argument("--world-dir", type=Path, default=WORLD_DIR, help="the built-in world's files, made on first "
                       "use (default: runs/world in the repository)")
        b.add_argument("--layers", type=data.positive_int, help="decoder layers")
        b.add_argument("--width", type=data.positive_int, help="decoder hidden size (4 heads, 2 KV heads)")
        b.add_argument("--ffn", type=data.positive_int, help="SwiGLU intermediate size")
        b.add_argument("--vit-pos", type=float, help="amplitude of the ViT's 2-D sin-cos positions (0: N(0, 0.02))")
        b.add_argument("--vision-steps", type=int, help="pretrain ViT and vision_proj this many steps to name each "
                       "cell's colour, shape and place, then keep them frozen (0: they train with the decoder)")
        b.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: " + {
            "build-policy": "the world's, runs/world/tokenizer.model",
            "build-judge": "the policy's, checkpoints/world-sft/tokenizer.model"}[name] + ")")
        b.add_argument("--steps", type=data.positive_int, help="SFT steps")
        b.add_argument("--eval-every", type=int, help="held-out evaluation every N SFT steps (0: at the end)")
        b.add_argument("--seed", type=int, default=0, help="initialisation, vision pretraining and SFT data order")
        b.add_argument("--nproc", type=data.positive_int, default=2, help="torchrun processes for the SFT stage")
        b.add_argument("--resume", action="store_true", help="continue the SFT stage in --out")
        b.add_argument("--init-only", action="store_true", help="write init/ and sft.json, print the SFT command")
        b.set_defaults(**{k: v for k, v in defaults.items()}, run=build)
    d = sub.add_parser("deepen", help="stack identity layers on a trunk", description=deepen.__doc__,
                       formatter_class=data.HelpFormatter, allow_abbrev=False)
    d.add_argument("--init", type=Path, required=True, help="the trunk (a checkpoint directory)")
    d.add_argument("--add-layers", type=data.positive_int, required=True, help="identity layers added on top")
    d.add_argument("--out", type=Path, required=True, help="the deeper checkpoint's directory")
    d.add_argument("--seed", type=int, default=0, help="initialisation of the new layers' weights")
    d.set_defaults(run=deepen)
    cleaning.add_commands(sub)
    a = p.parse_args(argv)
    if a.command.startswith("build"):
        a.out = a.out.resolve()   # train.py runs from the repository's root
    return a


def main(argv=None):
    a = parse_args(argv)
    return a.run(a)
