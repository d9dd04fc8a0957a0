"""What a reader meets before the code is true: every flag's --help names its default, every `file: function` the
README's reading order names exists, and every figure the README states for a shipped checkpoint is in that
checkpoint's summary.json."""
import argparse
import ast
import json
import random
import re
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT
import bon
import clean
import figures
import train
from world import build

SVG = "{http://www.w3.org/2000/svg}"


class Parsed(Exception):
    pass


def parser_of(main, argv, monkeypatch):
    """The parser an entry point builds, caught as it parses."""
    def grab(self, *a, **k):
        raise Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(Parsed) as e:
        main(argv)
    return e.value.args[0]


def parsers(monkeypatch):
    """(name, parser) for every stage of train.py, bon.py, clean.py and every `python -m world` command."""
    out = [(f"train.py --stage {s}", train.stage_parser(s, {**train.RECIPE[s], **train.WORLD[s]}))
           for s in train.RECIPE]
    out += [("bon.py", parser_of(bon.main, [], monkeypatch)), ("clean.py", parser_of(clean.main, [], monkeypatch))]
    world = parser_of(build.parse_args, [], monkeypatch)
    sub = next(a for a in world._actions if isinstance(a, argparse._SubParsersAction))
    return out + [(f"python -m world {name}", p) for name, p in sub.choices.items()]


def test_every_flag_says_what_it_does_and_its_default(monkeypatch):
    """A flag's help, as --help prints it, names its default, unless the flag is required, a positional argument or a
    switch (off unless given)."""
    seen = set()
    for name, p in parsers(monkeypatch):
        formatter = p._get_formatter()
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{flag} has no help"
            if action.required or not action.option_strings or action.nargs == 0:
                continue
            shown = formatter._get_help_string(action) % dict(vars(action), prog=p.prog)
            assert "default" in shown, f"{flag}: its help does not name its default: {shown!r}"
            seen.add(flag)
    assert {"train.py --stage ppo --steps", "bon.py -n/--n", "clean.py --flag-fraction",
            "python -m world build-policy --layers", "python -m world arms --seed"} <= seen


def test_defaults_the_world_overrides_are_shown_both_ways():
    p = train.stage_parser("rm", {**train.RECIPE["rm"], **train.WORLD["rm"]})
    text = p.format_help()
    assert "0.0003 on the built-in world, 1e-05 with --data" in " ".join(text.split())
    assert "auto" not in next(a for a in p._actions if a.dest == "freeze_vision").choices


def test_reward_curves_draw_a_trend_over_the_raw_points_and_the_heldout_points(tmp_path):
    """The accuracy panel of a reward-model run: every logged batch a faint dot, over them the centred mean of 9
    logged points (checked against a naive loop), and the held-out accuracy as large dots, from the held-out lines
    of the log and, at the last step, from summary.json."""
    rng = random.Random(0)
    acc = [min(1.0, 0.6 + 0.005 * i + rng.uniform(-0.15, 0.15)) for i in range(40)]
    lines = [{"step": 10 * (i + 1), "loss": 1 - a, "accuracy": a, "grad_norm": 1.0} for i, a in enumerate(acc)]
    lines.insert(20, {"step": 200, "heldout_accuracy": 0.7})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "summary.json").write_text(json.dumps({"stage": "rm", "steps": 400, "heldout_accuracy": 0.81}))
    figures.write_curves(tmp_path, ["loss", "accuracy"], "reward model")
    root = ET.fromstring((tmp_path / "curves.svg").read_text())
    trend = [[tuple(map(float, p.split(","))) for p in el.get("points").split()] for el in root.iter(f"{SVG}polyline")]
    assert [len(t) for t in trend] == [40, 40]
    _, y = zip(*trend[1])   # pixels: y = a + b * accuracy on the panel's axis
    want = [sum(acc[max(0, i - 4):i + 5]) / len(acc[max(0, i - 4):i + 5]) for i in range(40)]
    b = (y[-1] - y[0]) / (want[-1] - want[0])
    assert y == pytest.approx([y[0] + b * (w - want[0]) for w in want], abs=0.15)
    dots = [(float(c.get("cx")), float(c.get("cy")), float(c.get("r"))) for c in root.iter(f"{SVG}circle")]
    held = [(x, y_) for x, y_, r in dots if r == 4.0]
    assert len(dots) == 80 + 2 and len(held) == 2   # each batch in both panels; held-out in the accuracy panel only
    assert held[0][1] == pytest.approx(y[0] + b * (0.7 - want[0]), abs=0.15) and held[1][0] == trend[1][-1][0]
    assert held[1][1] == pytest.approx(y[0] + b * (0.81 - want[0]), abs=0.15)
    words = [el.text for el in root.iter(f"{SVG}text")]
    assert "held-out" in words and "mean of 9 logged" in words


def defined_names(path):
    """Every top-level function and class of a Python file, and every method as Class.method."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)}
    return names


def reading_order():
    """(file, name) for each `file: name` of the README's reading order, and each `name` after it in the same cell
    part (`model.py: Attention`, `FeedForward`), up to the next section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reading order"):]
    section = section[:section.index("\n## ", 1)]
    named = []
    for line in section.splitlines():
        for part in re.split(r"[;|]|->", line):
            file = cls = None
            for span in re.findall(r"`([^`]+)`", part):
                if m := re.fullmatch(r"([\w/]+\.py): ([\w.]+)", span):
                    file, name = m.groups()
                    cls = name.split(".")[0] if "." in name else None
                    named.append((file, cls, name))
                elif file and re.fullmatch(r"[A-Za-z_][\w.]*", span):
                    named.append((file, cls, span))   # `Class.method`, `other_method`: the same class's
    return named


def test_every_function_the_reading_order_names_exists():
    named = reading_order()
    files = {f for f, _, _ in named}
    assert {"train.py", "ppo.py", "common.py", "world/checker.py", "reward.py"} <= files, files
    for file, cls, name in named:
        assert (ROOT / file).is_file(), f"README names {file}, which is not in the repository"
        defined = defined_names(ROOT / file)
        assert name in defined or f"{cls}.{name}" in defined, f"README names {file}: {name}, which it does not define"


def numbers_in(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers_in(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers_in(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_every_figure_the_readme_gives_for_a_shipped_checkpoint_is_in_its_summary():
    """A sentence of the README that names `checkpoints/NAME` states only decimals that NAME/summary.json holds (to
    the digits stated), and each shipped checkpoint has such a sentence."""
    blocks = re.split(r"\n\s*\n|\n(?=[-#|] )", (ROOT / "README.md").read_text())   # paragraphs, items, rows
    sentences = [s for b in blocks for s in re.split(r"(?<=[.)])\s+(?=[A-Z`(])", " ".join(b.split()))]
    shipped = sorted(p.parent for p in (ROOT / "checkpoints").glob("*/summary.json"))
    assert shipped
    for ckpt in shipped:
        held = numbers_in(json.loads((ckpt / "summary.json").read_text()))
        stated = [s for s in sentences if f"`checkpoints/{ckpt.name}`" in s and re.search(r"\b0\.\d+", s)]
        assert stated, f"the README states no figure for checkpoints/{ckpt.name}"
        for s in stated:
            for num in re.findall(r"(?<![\w.-])\d+\.\d+(?![\w.])", s):
                digits = len(num.split(".")[1])
                assert any(round(v, digits) == float(num) for v in held), \
                    f"README: {num} for checkpoints/{ckpt.name} is not in its summary.json ({s!r})"
