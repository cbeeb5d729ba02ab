"""SeLa, SwAV and the neighbour heads under DistributedDataParallel (2 CPU processes, gloo) equal a single-process run.

Equality is up to floating-point summation order: DDP averages two slice gradients instead of one
batch gradient, the Sinkhorn marginals and the global BatchNorm statistics are all-reduced. Those
differ from one process by ~1e-7 relative per step; over a short schedule that stays far below the
tolerances here (prototypes atol 1e-4) and flips at most a sample whose two best clusters tie.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from selflabel.config import load_config
from selflabel.runfiles import read_labels
from selflabel.sample import sample_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _features() -> np.ndarray:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 24)) * 2
    truth = rng.permutation(np.repeat(np.arange(5), 40))  # 200 rows
    return (centers[truth] + rng.normal(size=(200, 24))).astype(np.float32)


# SeLa with an MLP head (BatchNorm: GlobalBatchNorm1d under DDP) and a balanced final step; SwAV with a
# queue (batch 40 < 4 k) so per-rank queues and the distributed codes are exercised, final Sinkhorn too.
CASES = {
    "sela": ["sela.epochs=4", "sela.label_updates=2", "sela.batch_size=40", "sela.head=mlp", "sela.hidden_dim=32",
             "sela.final_assign=sinkhorn"],
    "swav": ["swav.epochs=4", "swav.batch_size=40", "swav.hidden_dim=32", "swav.proj_dim=16", "swav.queue_start_epoch=1",
             "swav.final_assign=sinkhorn"],
    # heads started from the (distributed) estimated-size clustering, 2 self-labelling epochs, a final label step
    "neighbors": ["neighbors.epochs=2", "neighbors.self_label_epochs=2", "neighbors.batch_size=40",
                  "neighbors.neighbors=5", "neighbors.n_heads=3", "neighbors.final_assign=sinkhorn",
                  "neighbors.confidence=0.6", "neighbors.cpu_threads=1"],
}
EPOCHS = 4  # every case trains 4 epochs (the resumed run starts after the last)


def _train(method, feats, out_dir):
    from selflabel.train.neighbors import train_neighbors
    from selflabel.train.sela import train_sela
    from selflabel.train.swav import train_swav

    cfg = load_config(None, [*CASES[method], "seed=5"])
    fn = {"sela": train_sela, "swav": train_swav, "neighbors": train_neighbors}[method]
    return fn(feats, 5, cfg, heads=[3], out_dir=out_dir)


def _worker(rank, world, port, method, feats, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = _train(method, feats, out + ".ckpt")
    np.savez(out + f".{rank}.npz", labels=res.labels, protos=res.prototypes, probs=res.probs, head3=res.head_labels[3],
             loss=np.array(res.info["loss"]))
    del res
    from selflabel.distributed import context, shutdown

    shutdown(context())


@pytest.mark.parametrize("method", ["sela", "swav", "neighbors"])
def test_ddp_trainer_equals_single_process(tmp_path, method):
    feats = _features()
    single = _train(method, feats, None)
    out = str(tmp_path / method)
    mp.spawn(_worker, args=(2, _free_port(), method, feats, out), nprocs=2, join=True)
    r0, r1 = np.load(out + ".0.npz"), np.load(out + ".1.npz")
    for key in ("labels", "protos", "probs", "head3", "loss"):  # every rank returns the same, complete result
        np.testing.assert_array_equal(r0[key], r1[key])
    assert len(r0["labels"]) == 200
    np.testing.assert_array_equal(r0["labels"], single.labels)
    np.testing.assert_array_equal(r0["head3"], single.head_labels[3])
    np.testing.assert_allclose(r0["protos"], single.prototypes, atol=1e-4)
    np.testing.assert_allclose(r0["probs"], single.probs, atol=1e-4)
    np.testing.assert_allclose(r0["loss"], single.info["loss"], rtol=1e-4)
    # only rank 0 wrote the checkpoint, and it resumes to the same state in one process
    ckpt = tmp_path / f"{method}.ckpt" / "checkpoints" / f"{method}.pt"
    assert ckpt.is_file() and not list(ckpt.parent.glob(".*tmp*"))
    resumed = _train(method, feats, tmp_path / f"{method}.ckpt")
    assert resumed.info["resumed_from_epoch"] == EPOCHS
    np.testing.assert_array_equal(resumed.labels, single.labels)


def test_batch_size_not_divisible_is_input_error(tmp_path):
    mp.spawn(_odd_batch_worker, args=(2, _free_port(), str(tmp_path / "msg.txt")), nprocs=2, join=True)
    assert "divisible" in (tmp_path / "msg.txt").read_text()


def _odd_batch_worker(rank, world, port, out):
    import torch.distributed as dist

    from selflabel.errors import InputError
    from selflabel.train.sela import train_sela

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train_sela(_features(), 5, load_config(None, ["sela.batch_size=41", "sela.epochs=1"]))
    except InputError as exc:
        if rank == 0:
            with open(out, "w") as f:
                f.write(str(exc))
    dist.destroy_process_group()


def _run(cmd, env=None, timeout=400):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _torchrun(*args, script: list[str] | None = None):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *(script or ["-m", "selflabel"]), *args]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sela", "swav"])
def test_torchrun_label_equals_single_process(tmp_path, method):
    sets = ["--set", f"{method}.epochs=3", "--set", f"{method}.batch_size=50"]
    common = ["label", str(sample_dir()), "--method", method, "--backbone", "tiny", "--k", "4", "--seed", "3", "-q",
              "--device", "cpu", *sets]
    one = _run([sys.executable, "-m", "selflabel", *common, "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1")])
    assert one.returncode == 0, one.stderr[-4000:]
    two = _run(_torchrun(*common, "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "c2")),
               env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    a, b = read_labels(tmp_path / "one"), read_labels(tmp_path / "two")
    assert [r.path for r in a] == [r.path for r in b] and len(a) == 100
    assert [r.cluster for r in a] == [r.cluster for r in b]
    np.testing.assert_allclose([r.confidence for r in a], [r.confidence for r in b], atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "one" / "prototypes.npy"), np.load(tmp_path / "two" / "prototypes.npy"),
                               atol=1e-4)


def test_failed_rank_stops_the_job(tmp_path):
    # the collectives' deadline is far beyond the subprocess's: only torchrun stopping the job ends it in time
    proc = _run(_torchrun("label", str(sample_dir()), "--backbone", "tiny", "--k", "4", "-q", "--device", "cpu",
                          "--out", str(tmp_path / "r"),
                          "--cache-dir", str(tmp_path / "c"), script=[str(Path(__file__).parent / "drivers" / "fail_rank.py"), "1"]),
                env={"OMP_NUM_THREADS": "1", "SELFLABEL_DIST_TIMEOUT": "3600"}, timeout=300)
    assert proc.returncode != 0
    assert "failed on purpose" in proc.stdout + proc.stderr
    assert "Timed out" not in proc.stdout + proc.stderr  # stopped by the failure, not by a collective's timeout


# ---- end-to-end fine-tuning under DDP: image crops through the backbone inside the DDP forward, the
# backbone's BatchNorm2d on global-batch statistics (GlobalBatchNorm2d), each rank its slice of every batch
FINETUNE_CASES = {
    "sela": ["sela.epochs=1", "sela.finetune_epochs=2", "sela.batch_size=12", "sela.finetune_lr=0.05",
             "sela.label_updates=3"],
    "swav": ["swav.epochs=1", "swav.finetune_epochs=2", "swav.batch_size=12", "swav.nmb_crops=[2,2]",
             "swav.freeze_prototypes_iters=0", "swav.hidden_dim=32", "swav.proj_dim=16"],
}


def _finetune_inputs(root):
    """36 generated images (3 colours of square on noise) as files, the tiny CNN's initial state, features."""
    import torch
    from PIL import Image

    from selflabel.backbones import create_backbone

    rng = np.random.default_rng(0)
    colors = [(220, 30, 30), (30, 200, 40), (40, 40, 220)]
    paths = []
    for i in range(36):
        arr = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
        arr[8:32, 8:32] = colors[i % 3]
        paths.append(root / f"img{i:02d}.png")
        Image.fromarray(arr).save(paths[-1])
    bb = create_backbone("tiny")
    bb.image_size = 32
    torch.save(bb.state_dict(), root / "init.pt")
    with torch.no_grad():
        feats = bb(torch.stack([bb.make_transform(32)(Image.open(p).convert("RGB")) for p in paths])).global_feat.numpy()
    return paths, feats


def _finetune(method, paths, feats, init):
    import torch

    from selflabel.backbones import create_backbone
    from selflabel.train.sela import train_sela
    from selflabel.train.swav import train_swav

    bb = create_backbone("tiny")
    bb.image_size = 32
    bb.load_state_dict(torch.load(init, weights_only=True))
    cfg = load_config(None, [*FINETUNE_CASES[method], "seed=3", "cluster.finetune=true", "backbone.num_workers=0"])
    fn = train_sela if method == "sela" else train_swav
    res = fn(feats, 3, cfg, records=list(paths), backbone=bb)
    return res, {k: v.detach().numpy().copy() for k, v in bb.state_dict().items() if v.dtype.is_floating_point}


def _finetune_worker(rank, world, port, method, paths, feats, init, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res, weights = _finetune(method, paths, feats, init)
    np.savez(out + f".{rank}.npz", labels=res.labels, probs=res.probs, loss=np.array(res.info["loss"]),
             **{"bb." + k: v for k, v in weights.items()})
    from selflabel.distributed import context, shutdown

    shutdown(context())


@pytest.mark.parametrize("method", ["sela", "swav"])
def test_ddp_finetune_equals_single_process(tmp_path, method):
    paths, feats = _finetune_inputs(tmp_path)
    single, weights = _finetune(method, paths, feats, tmp_path / "init.pt")
    assert single.info["mode"] == "finetune"
    out = str(tmp_path / method)
    mp.spawn(_finetune_worker, args=(2, _free_port(), method, paths, feats, tmp_path / "init.pt", out), nprocs=2, join=True)
    r0, r1 = np.load(out + ".0.npz"), np.load(out + ".1.npz")
    np.testing.assert_array_equal(r0["labels"], r1["labels"])
    np.testing.assert_array_equal(r0["labels"], single.labels)
    np.testing.assert_allclose(r0["probs"], single.probs, atol=1e-4)
    np.testing.assert_allclose(r0["loss"], single.info["loss"], rtol=1e-4)
    trained = [k for k in weights if not np.array_equal(weights[k], torch_init(tmp_path)[k])]
    assert any(k.startswith("net.0.") for k in trained)  # the backbone was trained end to end ...
    for k, v in weights.items():  # ... to the same weights and BatchNorm statistics on both ranks and in one process
        np.testing.assert_allclose(r0["bb." + k], v, atol=1e-4, err_msg=k)
        np.testing.assert_array_equal(r0["bb." + k], r1["bb." + k])


def torch_init(root):
    import torch

    return {k: v.numpy() for k, v in torch.load(root / "init.pt", weights_only=True).items()}
