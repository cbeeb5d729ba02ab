"""Run the selflabel CLI in this process and kill -9 it at an exact event: a deterministic crash.

    python tests/drivers/killer.py EVENT N selflabel-args...

EVENT is where the N-th occurrence kills the process (SIGKILL, as a machine crash or the OOM killer):
  shard           after the N-th feature cache shard is committed
  checkpoint-mid  inside the N-th trainer checkpoint write: its temp file is complete, not yet renamed
  export          after the N-th image is copied into an ImageFolder export's temp tree
Failure injection lives here, not in the package: the package only exposes the events.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys

EVENT, N = sys.argv[1], int(sys.argv[2])
count = 0


def _hit() -> None:
    global count
    count += 1
    if count == N:
        os.kill(os.getpid(), signal.SIGKILL)


if EVENT == "shard":
    from selflabel.features import FeatureCache

    _add = FeatureCache.add

    def add(self, digests, feats):
        _add(self, digests, feats)
        _hit()

    FeatureCache.add = add
elif EVENT == "checkpoint-mid":
    _replace = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith(".pt"):
            _hit()
        return _replace(src, dst, *a, **k)

    os.replace = replace
elif EVENT == "export":
    _copy2 = shutil.copy2

    def copy2(src, dst, *a, **k):
        out = _copy2(src, dst, *a, **k)
        _hit()
        return out

    shutil.copy2 = copy2
else:
    raise SystemExit(f"unknown event {EVENT!r}")

from selflabel.cli import app  # noqa: E402  (after the patches)

app(sys.argv[3:], prog_name="selflabel")
