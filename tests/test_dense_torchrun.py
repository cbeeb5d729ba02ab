"""`torchrun ... label --dense`: only rank 0 runs the dense stage; the other ranks wait for it however
long it takes (not for SELFLABEL_DIST_TIMEOUT), and the run equals a single-process one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from selflabel.runfiles import read_labels

from conftest import COLORS, make_image

SLOW_DENSE = Path(__file__).resolve().parent / "drivers" / "slow_dense.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_dense_stage_longer_than_the_deadline(tmp_path):
    data = tmp_path / "imgs"
    for ci, (name, c) in enumerate(COLORS.items()):
        for i in range(6):
            make_image(data / name / f"{i}.png", c, size=(64, 48), seed=ci * 10 + i)
    args = ["label", str(data), "--backbone", "tiny", "--k", "3", "--dense", "-q", "--device", "cpu",
            "--set", "dense.image_size=64", "--set", "dense.k_parts=6", "--set", "backbone.num_workers=0"]
    timeout_s = 15  # generous: the other collectives must not hit it on a loaded machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(SLOW_DENSE), str(timeout_s + 5), *args,
           "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "c2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFLABEL_DIST_TIMEOUT": str(timeout_s)}
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-12000:]
    one = subprocess.run([sys.executable, "-m", "selflabel", *args, "--out", str(tmp_path / "one"),
                          "--cache-dir", str(tmp_path / "c1")], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["dense"]["n_images"] == 18
    assert [(r.path, r.cluster) for r in read_labels(tmp_path / "two")] == \
           [(r.path, r.cluster) for r in read_labels(tmp_path / "one")]
    d1 = json.loads((tmp_path / "one" / "dense" / "dense.json").read_text())
    d2 = json.loads((tmp_path / "two" / "dense" / "dense.json").read_text())
    assert d1["part_concept"] == d2["part_concept"] and len(d2["images"]) == 18
