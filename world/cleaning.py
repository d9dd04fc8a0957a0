"""What cleaning buys a retrained policy (README: cleaning that pays). Arms continue one SFT checkpoint for the same
steps, batch and seed on different rows of the world's SFT set: (a) every row, sft_train.json itself; (b) the rows
`clean.py` keeps, its kept.json; (c) the oracle, every row without a labelled failure (sft_errors.json); (d) as many
rows as (b) drops, dropped at random; (e) the rows another cleaner keeps. This writes (c) and (d), each in the
input's format with its image paths rewritten to resolve from its own directory, and compares the arms' runs:

    python -m world arms --kept runs/clean-sft/kept.json --out runs/arms-data      # writes oracle/ and random/
    python -m world compare-arms runs/arms                                           # reads runs/arms/<arm>-s<seed>/
"""
import json
import os
import random
from pathlib import Path

import data
from world import WORLD_DIR
from world.checker import content_family

METRICS = {"instruction following": "heldout_instruction_following", "follow-ups right": "heldout_followup_right",
           "right on both": "heldout_right", "content": "heldout_accuracy"}
FAMILIES = ("perception", "text", "followup")   # content_family's: first-turn image questions, text, second turns


def oracle_rows(rows, errors):
    """The rows no labelled failure names (errors: sft_errors.json's rows, by id)."""
    bad = {e["id"] for e in errors}
    return [r for r in rows if r["id"] not in bad]


def random_rows(rows, n_drop, seed):
    """The rows left after dropping n_drop of them, drawn uniformly without replacement; the order is kept."""
    drop = set(random.Random(seed).sample(range(len(rows)), n_drop))
    return [r for i, r in enumerate(rows) if i not in drop]


def rebased(row, src_dir, out_dir):
    """The row with its relative image paths rewritten to name the same files from out_dir."""
    if "image" not in row:
        return row
    fix = lambda p: p if os.path.isabs(p) else os.path.relpath(os.path.join(src_dir, p), out_dir)  # noqa: E731
    return dict(row, image=[fix(p) for p in row["image"]] if isinstance(row["image"], list) else fix(row["image"]))


def write_arms(sft_path, errors_path, kept_path, out_dir, seed=0):
    """Write out_dir/oracle/kept.json and out_dir/random/kept.json; returns {arm: rows written}."""
    sft_path, out_dir = Path(sft_path).resolve(), Path(out_dir).resolve()
    rows = json.loads(sft_path.read_text())
    n_kept = len(json.loads(Path(kept_path).read_text()))
    arms = {"oracle": oracle_rows(rows, json.loads(Path(errors_path).read_text())),
            "random": random_rows(rows, len(rows) - n_kept, seed)}
    for name, sel in arms.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        (out_dir / name / "kept.json").write_text(json.dumps([rebased(r, sft_path.parent, out_dir / name)
                                                              for r in sel], indent=1))
    return {k: len(v) for k, v in arms.items()}


def mean_sd(xs):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else None


def compare(runs, prompts):
    """{arm: [each seed's summary.json]} -> {arm: {metric: (mean, sd over seeds or None for one seed, seeds)}}.
    Content accuracy per family also gives its prompt count and, where fewer than 100 prompts carry it, the binomial
    standard error of one run's figure at the mean, sqrt(p (1 - p) / n)."""
    n = {f: sum(content_family(p) == f for p in prompts) for f in FAMILIES}
    table = {}
    for arm, summaries in sorted(runs.items()):
        row = {name: (*mean_sd([s[key] for s in summaries]), len(summaries)) for name, key in METRICS.items()}
        for f in FAMILIES:
            m, sd = mean_sd([s["heldout_accuracy_by_family"][f] for s in summaries])
            row[f"content: {f}"] = (m, sd, len(summaries), n[f], (m * (1 - m) / n[f]) ** 0.5 if n[f] < 100 else None)
        table[arm] = row
    return table


def print_table(table):
    for arm, row in table.items():
        cells = []
        for name, (m, sd, seeds, *rest) in row.items():
            cell = f"{name} {m:.3f}" + (f" ± {sd:.3f}" if sd is not None else "") + f" ({seeds} seed{'s' * (seeds > 1)}"
            if rest:
                cell += f", {rest[0]} prompts" + (f", SE {rest[1]:.3f}" if rest[1] is not None else "")
            cells.append(cell + ")")
        print(f"{arm}: " + "; ".join(cells))


def compare_arms(a):
    """Read <dir>/<arm>-s<seed>/summary.json for every arm and seed, print and return the comparison."""
    runs = {}
    for path in sorted(Path(a.runs).glob("*-s*/summary.json")):
        runs.setdefault(path.parent.name.rsplit("-s", 1)[0], []).append(json.loads(path.read_text()))
    if not runs:
        raise FileNotFoundError(f"{a.runs}: no <arm>-s<seed>/summary.json inside")
    table = compare(runs, json.loads((Path(a.world_dir) / "heldout_prompts.json").read_text()))
    print_table(table)
    return table


def arms(a):
    counts = write_arms(Path(a.world_dir) / "sft_train.json", Path(a.world_dir) / "sft_errors.json", a.kept, a.out,
                        a.seed)
    print(f"wrote {a.out}/oracle/kept.json ({counts['oracle']} rows) and {a.out}/random/kept.json "
          f"({counts['random']} rows, as many as {a.kept} keeps)")
    return counts


def add_commands(sub):
    p = sub.add_parser("arms", help="the cleaning comparison's oracle and random arms", description=__doc__,
                       formatter_class=data.HelpFormatter, allow_abbrev=False)
    p.add_argument("--kept", required=True, help="clean.py's kept.json: the random arm keeps as many rows")
    p.add_argument("--out", required=True, help="writes OUT/oracle/kept.json and OUT/random/kept.json")
    p.add_argument("--world-dir", default=str(WORLD_DIR), help="the built-in world's files, made on first use "
                   "(default: runs/world in the repository)")
    p.add_argument("--seed", type=int, default=0, help="which rows the random arm drops")
    p.set_defaults(run=arms)
    c = sub.add_parser("compare-arms", help="mean and spread of every arm's held-out figures", description=__doc__,
                       formatter_class=data.HelpFormatter, allow_abbrev=False)
    c.add_argument("runs", help="a directory of <arm>-s<seed> SFT runs")
    c.add_argument("--world-dir", default=str(WORLD_DIR), help="the built-in world's files, made on first use "
                   "(default: runs/world in the repository)")
    c.set_defaults(run=compare_arms)
