"""`selflabel` with a dense stage that outlasts the collectives' deadline on rank 0 (for torchrun tests).

    python -m torch.distributed.run ... tests/drivers/slow_dense.py SECONDS selflabel-args...

Rank 0's dense stage runs, then holds on for SECONDS more: a dense stage longer than
SELFLABEL_DIST_TIMEOUT, as on a large folder, without a large folder. The delay simulates work; it
synchronises nothing.
"""
from __future__ import annotations

import sys
import time

from selflabel import pipeline
from selflabel.cli import app

SECONDS = float(sys.argv[1])
_segment = pipeline.segment


def slow_segment(*args, **kwargs):
    out = _segment(*args, **kwargs)
    time.sleep(SECONDS)
    return out


pipeline.segment = slow_segment
app(sys.argv[2:], prog_name="selflabel")
