"""`selflabel` under torchrun with the ranks disagreeing on `--amp auto`, as a timed precision probe on
a loaded machine can: rank 0 keeps this CPU's choice, every other rank gets the other precision.

    python -m torch.distributed.run ... tests/drivers/split_precision.py selflabel-args...
"""
from __future__ import annotations

import os
import sys

from selflabel import devices
from selflabel.cli import app

_choose = devices.choose_precision


def choose_by_rank(cache_root=None) -> str:
    mine = _choose(cache_root)
    if int(os.environ.get("RANK", "0")) == 0:
        return mine
    return "fp32" if mine == "bf16" else "bf16"


devices.choose_precision = choose_by_rank
app(sys.argv[1:], prog_name="selflabel")
