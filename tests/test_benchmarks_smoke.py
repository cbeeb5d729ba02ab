"""Fast checks of the benchmark scripts' pure helpers (no timing assertions, no shared data)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import __main__ as runner
from benchmarks import community, end_to_end, features, memory, plots
from selflabel.data import ImageRecord, scan_folder


# --- community --------------------------------------------------------------------------------

def test_planted_graph_is_weighted_and_labelled():
    g, truth = community.planted_graph(100, 5, mu=0.3, seed=0)
    assert g.number_of_nodes() == 100
    assert np.bincount(truth).tolist() == [20] * 5
    w = np.array([d["weight"] for _, _, d in g.edges(data=True)])
    assert len(w) == g.number_of_edges() > 0
    assert w.min() >= 0.1 and w.max() <= 1.0
    same = np.array([truth[u] == truth[v] for u, v in g.edges()])
    assert w[same].mean() > w[~same].mean()  # weights carry the planted structure
    assert 0.2 < (~same).mean() < 0.4  # mixing close to mu


@pytest.mark.parametrize("name", list(community.LIBRARIES))
def test_louvain_finds_the_planted_partition_of_a_100_node_graph(name):
    g, truth = community.planted_graph(100, 5, mu=0.3, seed=1)
    labels = community.LIBRARIES[name](g, seed=0)
    s = community.score(g, truth, labels)
    assert s["nmi"] > 0.95
    assert s["n_communities"] == 5
    planted_q = community.score(g, truth, truth)["modularity"]
    assert s["modularity"] == pytest.approx(planted_q, abs=0.02)


def test_community_helpers():
    assert community.groups_for(100) == 5
    assert community.groups_for(10_000) == 20
    assert community.is_monotone([1, 1, 3, 8])
    assert not community.is_monotone([54, 13, 8, 16])
    assert community.span([3, 5, 4]) == "3-5" and community.span([7, 7]) == "7"
    lab = np.array([0, 1, 0, 2])
    comms = community.communities_from_labels(lab)
    np.testing.assert_array_equal(community.labels_from_communities(comms, 4), lab)
    with pytest.raises(ValueError):
        community.planted_graph(5, 5)


# --- runner -----------------------------------------------------------------------------------

def test_only_parsing():
    assert runner.parse_only(None) == list(runner.BENCHMARKS)
    assert runner.parse_only(["plots", "features"]) == ["features", "plots"]  # run order, not argv order
    assert runner.parse_only(["memory,community", "memory"]) == ["community", "memory"]
    with pytest.raises(ValueError, match="bogus"):
        runner.parse_only(["features", "bogus"])


def test_runner_rejects_an_unknown_name_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        runner.main(["--only", "nope"])
    assert exc.value.code == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_missing_module_is_skipped_with_a_note(capsys):
    assert runner.load_main("no_such_benchmark_xyz") is None
    status = runner.run_all(["no_such_benchmark_xyz"], quick=True)
    assert status["no_such_benchmark_xyz"][0].startswith("skipped")
    assert "does not exist" in capsys.readouterr().out
    assert callable(runner.load_main("community"))


def test_results_page_keeps_quick_and_full_apart(tmp_path: Path):
    for name, body in [("community", "FULL TABLE"), ("community-quick", "QUICK TABLE"),
                       ("sinkhorn_big", "SINKHORN PART"), ("communityx", "NOT OURS")]:
        (tmp_path / f"{name}.md").write_text(f"## {body}\n")
    (tmp_path / "plot-quick.png").write_bytes(b"")
    (tmp_path / "plot.png").write_bytes(b"")
    assert [p.name for p in runner.result_files("community", False, tmp_path)] == ["community.md"]
    assert [p.name for p in runner.result_files("community", True, tmp_path)] == ["community-quick.md"]
    page = runner.results_page({"community": ("ran", 1.0)}, False, "test machine", tmp_path)
    assert "FULL TABLE" in page and "SINKHORN PART" in page
    assert "QUICK TABLE" not in page and "NOT OURS" not in page
    assert "test machine" in page and "(plot.png)" in page and "plot-quick.png" not in page
    quick = runner.results_page({}, True, "m", tmp_path)
    assert "QUICK TABLE" in quick and "FULL TABLE" not in quick and "plot-quick.png" in quick


# --- features / end_to_end --------------------------------------------------------------------

def test_stratified_subset_is_balanced_and_deterministic():
    recs = [ImageRecord(f"{c}/{i}.jpg", Path(f"/x/{c}/{i}.jpg"), c) for c in "abc" for i in range(5)]
    sub = features.stratified(recs, 6)
    assert [r.gt for r in sub] == ["a", "b", "c", "a", "b", "c"]
    assert features.stratified(recs, 6) == sub
    assert features.stratified(recs, None) == recs


def test_shared_data_honours_the_env_override(tmp_path: Path, monkeypatch):
    (tmp_path / "set").mkdir()
    monkeypatch.setenv("SELFLABEL_SHARED_DATA", str(tmp_path))
    assert features.shared_data("set") == tmp_path / "set"
    with pytest.raises(SystemExit, match="not found"):
        features.shared_data("missing")


def test_link_subset_keeps_class_folders(color_folder: Path, tmp_path: Path):
    scan = scan_folder(color_folder, gt="folders")
    sub = features.stratified(scan.records, 6)
    dst = end_to_end.link_subset(sub, scan.root, tmp_path / "subset")
    again = scan_folder(dst, gt="folders")
    assert sorted(r.id for r in again.records) == sorted(r.id for r in sub)
    assert {r.gt for r in again.records} == {"red", "green", "blue"}
    assert all((dst / r.id).is_symlink() for r in sub)


# --- memory -----------------------------------------------------------------------------------

def test_synthetic_chunks_do_not_depend_on_chunking():
    whole = memory.synthetic_chunk(0, 8192, 8, 3)
    assert whole.dtype == np.float32 and (whole >= 0).all()
    np.testing.assert_array_equal(memory.synthetic_chunk(0, 8192, 8, 3), whole)
    assert not np.array_equal(memory.synthetic_chunk(8192, 16384, 8, 3), whole)


def test_memory_steps_in_process(tmp_path: Path):
    path = tmp_path / "f.npy"
    w = memory.run_step("write", path, 100, 16, 4)
    assert np.load(path).shape == (100, 16)
    r = memory.run_step("read", path, 100, 16, 4)
    for rep in (w, r):
        assert rep["hwm_kb"] >= rep["rss_start_kb"] > 0
        assert rep["anon_peak_kb"] > 0 and rep["seconds"] >= 0
        json.dumps(rep)


# --- plots ------------------------------------------------------------------------------------

def test_quality_plot_from_tiny_clusters(tmp_path: Path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = (np.eye(3, 16)[y] * 3 + rng.normal(0, 0.3, (60, 16))).astype(np.float32)
    q = plots.quality_vs_k(x, y, ks=(3, 5), seeds=(0,))
    assert set(q) == set(plots.METHODS)
    assert q["sinkhorn (ours)"][3]["nmi"][0] > 0.9
    plots.plot_quality(q, len(y), tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_sinkhorn_scores_are_cosines():
    s = plots.make_scores(50, 4)
    assert s.shape == (50, 4) and s.dtype.is_floating_point
    assert float(s.abs().max()) <= 1.0 + 1e-5
