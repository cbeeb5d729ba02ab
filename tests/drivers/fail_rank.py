"""`selflabel` under torchrun with one rank failing right after the process group is set up.

    python -m torch.distributed.run ... tests/drivers/fail_rank.py RANK selflabel-args...
"""
from __future__ import annotations

import sys

from selflabel import pipeline
from selflabel.cli import app
from selflabel.errors import SelflabelError

RANK = int(sys.argv[1])
_init = pipeline.init_from_env


def init_then_fail(*args, **kwargs):
    ctx = _init(*args, **kwargs)
    if ctx.rank == RANK:
        raise SelflabelError(f"rank {ctx.rank} failed on purpose (tests/drivers/fail_rank.py)")
    return ctx


pipeline.init_from_env = init_then_fail
app(sys.argv[2:], prog_name="selflabel")
