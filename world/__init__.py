"""The built-in world: tiny images of coloured shapes on a grid, with known ground truth, so that every command runs
on a laptop CPU and every answer can be checked. It is ours, not the paper's: it plays the part of real data
(questions, an SFT set written by a weaker model, preference pairs, a noisy set to clean) and of the paper's human
annotators (the checker), and its own small models play IXC-2.5 (checkpoints/world-sft, the policy) and a stronger
judge's trunk (checkpoints/world-judge).

    scene.py    the world itself: layouts, drawing, questions, instructions, follow-ups, answers as sentences
    checker.py  what a reader must trust: is an answer right (is_correct, follows, failure_kind), judge, eval_policy
    weaker.py   the weaker model's failures (the SFT set), preference pairs from a policy's graded samples, and the
                labelled cleaning set
    store.py    the files on disk: write_world, ensure_world (the cache in runs/world), the world's tokenizer, the
                pairs shipped beside the policy, held-out prompts
    cleaning.py `python -m world arms | compare-arms`: what cleaning the SFT set buys a retrained policy
    build.py    `python -m world ...`: the world's own models (the policy from scratch, the judge trunk, deeper
                trunks), as checkpoints that `train.py --init` reads

Perception is made easy on purpose: a 112x112 image is a 4x4 grid of 28-px cells, each cell is exactly one merged
vision token (2x2 ViT patches of 14 px), each object fills one cell, and the colours and shapes are few and far
apart, so that one token's pixels identify colour and shape.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORLD_DIR = ROOT / "runs" / "world"  # generated on first use, deterministic by seed
WORLD_SFT = ROOT / "checkpoints" / "world-sft"  # shipped: the world's pretrained policy (see its summary.json)
# shipped: a deeper trunk trained on right answers only, for a reward model that judges perception better than the
# policy produces it (train.py --stage rm --init WORLD_JUDGE; it shares WORLD_SFT's tokenizer, as PPO requires)
WORLD_JUDGE = ROOT / "checkpoints" / "world-judge"
# the tiny model of the built-in world: 112-px crops (4x4 merged tokens per view), a few narrow layers
WORLD_CONFIG = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, plora_rank=16, max_position_embeddings=4096, max_length=512,
                    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=112, patch_size=14))
WORLD_VERSION = 8            # ensure_world rewrites a cached world written by another version

# What the world is made of, named alike by the scenes, the answers and the checker
IMG, CELL, GRID = 112, 28, 4
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")


def quadrant(row, col):
    return ("top" if row < GRID // 2 else "bottom") + " " + ("left" if col < GRID // 2 else "right")
