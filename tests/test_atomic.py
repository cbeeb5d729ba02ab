import os

import numpy as np
import pytest

from selflabel.atomic import atomic_path, atomic_save_npy, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failure_keeps_old_content(tmp_path):
    p = tmp_path / "b.json"
    atomic_write_json(p, {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash in the middle")
    assert p.read_text().strip().startswith("{") and '"x": 1' in p.read_text()
    assert len(list(tmp_path.iterdir())) == 1


def test_npy_roundtrip_no_pickle(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_save_npy(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), a)
