"""Scoring at scale: `clean.py`, `bon.py` (on a file of prompts) and `evaluate.py` score their rows data-parallel
under torchrun, write each row's record as soon as it is scored, and continue a killed run with --resume. One
process is the same path with one rank. How to run it and what it costs at 7B: docs/scale.md.

    torchrun --nproc_per_node 8 clean.py --rm RM --data rows.json --out runs/clean   # the same files as 1 process
    torchrun --nproc_per_node 8 clean.py --rm RM --data rows.json --out runs/clean --resume   # after a kill

A run directory holds `scoring/run.json`, what its scores depend on (the input, the models, the flags that change a
score), and one file per rank, `scoring/rank-R.jsonl`. Rank R takes every world-th row still unscored, cuts its
share into length-sorted token-budget batches (batching.token_budget_batches, the training stages' batcher) and appends
each batch's records, whole lines, flushed, to its own file: a kill loses at most the batch in flight, and a line it
cut short is dropped when the file is read. Rank 0 then merges every rank's file into the input's order. The files
are Python's JSON (NaN allowed: a broken score must reach the output to be flagged there).

The rows are dealt by index, not sorted by length across the ranks first as a training step's are: a rank then
measures only its own rows' lengths (a million rows' images and tokens take minutes to read), and shares drawn
every world-th row hold the same mix of lengths.
"""
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

import batching
import common
import data

RUN_FILE = "run.json"


def add_scoring_args(p, budget=None):
    """--resume and --on-error; with `budget` (rows measured in tokens), --max-length and --token-budget too."""
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the output directory: score only the rows it has not scored (a "
                        "finished run is left as it is)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="a row that cannot be scored (a missing or unreadable image" + (", longer than --max-length"
                        if budget else "") + "): "
                        "fail names it and stops; skip names it, leaves it out and goes on (default: fail)")
    if budget:
        p.add_argument("--max-length", type=data.positive_int, default=16384,
                       help="longest row in tokens, image tokens included (default: 16384, the official "
                            "get_score's)")
        p.add_argument("--token-budget", type=data.positive_int, default=budget,
                       help=f"padded tokens per scoring batch (default: {budget})")


def setup(a):
    """(rank, world size): torchrun's, or (0, 1). Each rank's models go on its own GPU."""
    rank, world, device = common.setup_distributed()
    if world > 1 and str(a.device).startswith("cuda"):
        a.device = str(device)
    return rank, world


def fingerprint(path):
    """What a score depends on in a file (its sha256) or a model directory (its files' names, sizes and modification
    times: a 7B checkpoint is too large to hash at every start)."""
    path = Path(path).resolve()
    if path.is_dir():
        return {"path": str(path), "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns]
                                             for f in sorted(path.iterdir()) if f.is_file()}}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "sha256": h.hexdigest()}


def barrier(world):
    if world > 1:
        dist.barrier()


def start(out, run, resume, finished, rank, world):
    """Claim `out` for `run` (a JSON-able dict: inputs' and models' fingerprints, flags): a new directory, or with
    --resume the same run's. Another run's directory is refused in one line, as is an existing run without
    --resume, as train.py refuses. True when the run is already finished (`finished`, its last output, exists)."""
    out, run = Path(out), json.loads(json.dumps(run))
    path = out / "scoring" / RUN_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != run:
            differ = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
            raise ValueError(f"{out} holds the scores of another run (its {', '.join(differ)} differ); choose "
                             f"another output directory")
        if not resume:
            raise ValueError(f"{out} already holds this run's scores; pass --resume to continue it or choose "
                             f"another output directory")
        done = Path(out, finished).is_file()
        if done:
            common.log(rank, f"{out}: finished already; nothing to score")
        return done
    if resume:
        raise FileNotFoundError(f"--resume: {out} holds no scoring run to continue (expected {path})")
    barrier(world)  # every rank has read the directory before rank 0 makes it
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        data.atomic_write_text(path, json.dumps(run, indent=1))
    barrier(world)
    return False


def rank_file(out, rank):
    return Path(out) / "scoring" / f"rank-{rank}.jsonl"


def read_records(out):
    """{row: record} from every rank's file, whichever number of ranks wrote them; a last line without its newline
    (cut by a kill) is dropped."""
    done = {}
    for f in sorted(Path(out, "scoring").glob("rank-*.jsonl")):
        lines = f.read_bytes().split(b"\n")
        for lineno, line in enumerate(lines[:-1], 1):   # lines[-1]: empty, or a torn last line
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{lineno}: not a whole JSON record ({e.msg}); remove the file to score its "
                                 f"rows again") from None
            done.setdefault(rec["row"], rec)
    return done


def _open_own(out, rank):
    """This rank's file for appending, a torn last line cut off first so the next record starts a line."""
    f = rank_file(out, rank)
    f.parent.mkdir(parents=True, exist_ok=True)
    if f.is_file():
        text = f.read_bytes()
        whole = text.rfind(b"\n") + 1
        if whole < len(text):
            os.truncate(f, whole)
    return open(f, "a", encoding="utf-8")


class Progress:
    """Rank 0's line: rows scored by all ranks together (counted in their files), rows per second, time left."""

    def __init__(self, out, todo, world):
        self.files = [rank_file(out, r) for r in range(world)]
        self.seen = {f: [0, 0] for f in self.files}   # bytes read, newlines in them
        self.base, self.todo, self.t0, self.shown = self.count(), todo, time.time(), 0.0

    def count(self):
        for f in self.files:
            if f.is_file():
                with open(f, "rb") as fh:
                    fh.seek(self.seen[f][0])
                    new = fh.read()
                self.seen[f][0] += len(new)
                self.seen[f][1] += new.count(b"\n")
        return sum(n for _, n in self.seen.values())

    def show(self, last=False):
        if time.time() - self.shown < 1.0 and not last:
            return
        self.shown = time.time()
        done = min(self.count() - self.base, self.todo)
        rate = done / max(time.time() - self.t0, 1e-9)
        left = f"{(self.todo - done) / rate:.0f}s left" if rate > 0 else "time left unknown"
        print(f"\rscored {done}/{self.todo} rows, all ranks {rate:.1f} rows/s, {left}  ", end="\n" if last else "",
              file=sys.stderr, flush=True)


def score_rows(out, n, length, score, name, budget, on_error, rank, world, max_length=None):
    """Score rows 0..n-1 not yet on disk: this rank's share, in batches of at most `budget` padded tokens, each
    batch's records appended to its file as they come. `length(i)` is row i's tokens, `score(rows)` a list of
    records (dicts) for a batch, `name(i)` how an error names row i. A row longer than `max_length`, or whose
    length or batch raises (a batch that raises is scored row by row to find it), is reported: on_error "fail"
    stops there, "skip" records it as {"error": reason} and goes on."""
    done = read_records(out)
    todo = [i for i in range(n) if i not in done]
    mine = todo[rank::world]
    progress = Progress(out, len(todo), world) if rank == 0 else None
    barrier(world)  # every rank reads the same rows as done before any rank adds to them
    common.log(rank, f"scoring {len(todo)} of {n} rows on {world} process(es)" +
               (f" ({n - len(todo)} already scored)" if len(todo) < n else ""))
    with _open_own(out, rank) as f:
        def write(records):
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()

        def failed(i, reason):
            if on_error == "fail":
                raise ValueError(f"{name(i)}: {reason} (--on-error skip leaves it out)")
            print(f"skipped {name(i)}: {reason}", file=sys.stderr)
            write([{"row": i, "error": reason}])

        ok, lengths = [], []
        for i in mine:
            try:
                n_tokens = length(i)
            except (OSError, ValueError) as e:
                failed(i, str(e))
                continue
            if max_length and n_tokens > max_length:
                failed(i, f"{n_tokens} tokens, over --max-length {max_length}")
                continue
            ok.append(i)
            lengths.append(n_tokens)
        for batch in batching.token_budget_batches(lengths, budget, shuffle=False):
            rows = [ok[k] for k in batch]
            try:
                write([{"row": i, **rec} for i, rec in zip(rows, score(rows))])
            except (OSError, ValueError):
                for i in rows:
                    try:
                        rec = score([i])[0]
                    except (OSError, ValueError) as e:
                        failed(i, str(e))
                        continue
                    write([{"row": i, **rec}])
            if progress:
                progress.show()
    barrier(world)
    if progress:
        progress.show(last=True)


def merged(out, n):
    """Every row's record in the input's order (rank 0, after score_rows)."""
    done = read_records(out)
    missing = [i for i in range(n) if i not in done]
    if missing:
        raise ValueError(f"{out}: {len(missing)} of {n} rows have no score (the first: row {missing[0] + 1}); "
                         f"continue with --resume")
    return [done[i] for i in range(n)]


def finite(x):
    """A score for JSON meant for others (no bare NaN): None when not finite."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
