"""torchrun with 2 CPU processes (gloo) gives the same labels, prototypes and probabilities as one process."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch.multiprocessing as mp

from selflabel.runfiles import read_labels
from selflabel.sample import sample_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(tmp_path):
    common = ["--backbone", "mobilenet_v2", "--k", "10", "--cache-dir", str(tmp_path / "cache"), "--seed", "3", "-q",
              "--device", "cpu"]  # gloo CPU processes, also on a machine with one GPU
    _run([sys.executable, "-m", "selflabel", "label", str(sample_dir()), "--out", str(tmp_path / "one"), *common])
    (tmp_path / "cache2").mkdir()
    common[5] = str(tmp_path / "cache2")  # a fresh cache: the sharded extraction really runs
    # the ranks would pick different precisions on their own (tests/drivers/split_precision.py): rank 0's plan must hold
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), os.path.join(os.path.dirname(__file__), "drivers", "split_precision.py"), "label",
          str(sample_dir()), "--out", str(tmp_path / "two"), *common], env={"OMP_NUM_THREADS": "1"})
    one, two = read_labels(tmp_path / "one"), read_labels(tmp_path / "two")
    assert [r.path for r in one] == [r.path for r in two]
    assert [r.cluster for r in one] == [r.cluster for r in two]
    np.testing.assert_allclose([r.confidence for r in one], [r.confidence for r in two], atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "one" / "prototypes.npy"), np.load(tmp_path / "two" / "prototypes.npy"), atol=1e-4)
    # the two ranks split the extraction: every image computed exactly once, into the shared cache
    shards = list((tmp_path / "cache2").rglob("*.keys"))
    keys = [k for s in shards for k in s.read_text().split()]
    assert len(keys) == len(set(keys)) == 100 and len(shards) == 2, sorted(str(s.relative_to(tmp_path)) for s in shards)
    assert len({s.parent for s in shards}) == 1  # one engine and precision: one cache folder
    assert not any((tmp_path / "two").glob(".*tmp*"))


def _worker(rank, world, port, feats, out):
    import torch.distributed as dist

    from selflabel.cluster import sinkhorn_cluster
    from selflabel.distributed import context

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = sinkhorn_cluster(feats, 6, seed=1, ctx=context())
    if rank == 0:
        np.savez(out, labels=res.labels, protos=res.prototypes, probs=res.probs, conf=res.confidence,
                 iters=np.array(res.info["sinkhorn_iters"]))
    dist.destroy_process_group()


def test_distributed_sinkhorn_cluster_equals_single(tmp_path):
    from selflabel.cluster import sinkhorn_cluster

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16)) * 3
    truth = np.concatenate([rng.permutation(np.repeat(np.arange(6), 50)), [0, 1, 2]])  # 303 rows: unequal rank blocks
    feats = (centers[truth] + rng.normal(size=(303, 16))).astype(np.float32)
    single = sinkhorn_cluster(feats, 6, seed=1)
    mp.spawn(_worker, args=(2, _free_port(), feats, str(tmp_path / "d.npz")), nprocs=2, join=True)
    d = np.load(tmp_path / "d.npz")
    np.testing.assert_array_equal(d["labels"], single.labels)
    np.testing.assert_allclose(d["protos"], single.prototypes, atol=1e-5)
    np.testing.assert_allclose(d["probs"], single.probs, atol=1e-5)
    np.testing.assert_allclose(d["conf"], single.confidence, atol=1e-5)
    assert d["iters"].tolist() == single.info["sinkhorn_iters"]  # the same Sinkhorn solves, block by block
