"""Entry of the scoring resume tests: clean.py or bon.py (the first argument) whose rank KILL_RANK (default 0)
writes KILL_AFTER batches of records, then half of the next batch's first line, and kills itself with SIGKILL, as a
kill during a write leaves its file. Under torchrun, torchrun then stops the other ranks.

    KILL_AFTER=1 python -m torch.distributed.run --nproc_per_node 2 tests/killed_scoring.py clean.py --out OUT ...

A test cannot monkeypatch the processes torchrun starts, so this file is their entry point and patches itself.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scoring  # noqa: E402

KILL_AFTER, KILL_RANK = int(os.environ["KILL_AFTER"]), int(os.environ.get("KILL_RANK", "0"))
open_own = scoring._open_own


class Killing:
    """The rank's score file; the process dies in the middle of write number KILL_AFTER + 1."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def flush(self):
        self.f.flush()

    def write(self, text):
        if self.writes == KILL_AFTER:
            self.f.write(text[:text.index("\n") // 2])   # half a line: its end never reaches the file
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.writes += 1
        self.f.write(text)


def killing_open_own(out, rank):
    f = open_own(out, rank)
    return Killing(f) if rank == KILL_RANK else f


scoring._open_own = killing_open_own
if __name__ == "__main__":
    script = sys.argv.pop(1)
    sys.argv[0] = script
    runpy.run_path(str(Path(__file__).resolve().parents[1] / script), run_name="__main__")
