"""The stat-keyed digest memo: unchanged files are not read again; any change, or a racy stat, re-hashes."""
import logging
import os
import time

import numpy as np

from selflabel.backbones import create_backbone
from selflabel.data import file_digest, scan_folder
from selflabel.digests import DigestMemo
from selflabel.features import DIGEST_MEMO, extract_features


class Counting:
    """file_digest that counts the files it read."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path) -> str:
        self.paths.append(str(path))
        return file_digest(path)


def _aged(path, seconds: float = 100.0):
    """Set mtime back so the file is not 'racily clean' (ctime stays now, see test_racy_files_are_not_memoised)."""
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    monkeypatch.setattr("selflabel.digests.RACY_S", 0.0)  # ctime is always 'now' in a test
    files = [_aged(_write(tmp_path / f"f{i}.bin", bytes([i]) * 1000)) for i in range(5)]
    count = Counting()
    with DigestMemo(tmp_path / "memo.sqlite", count) as memo:
        first = [memo.digest(f) for f in files]
    assert len(count.paths) == 5 and first == [file_digest(f) for f in files]
    count2 = Counting()
    with DigestMemo(tmp_path / "memo.sqlite", count2) as memo:
        again = [memo.digest(f) for f in files]
        assert (memo.hits, memo.misses) == (5, 0)
    assert again == first and count2.paths == []


def test_any_change_rehashes(tmp_path, monkeypatch):
    monkeypatch.setattr("selflabel.digests.RACY_S", 0.0)
    f = _aged(_write(tmp_path / "a.bin", b"x" * 100))
    with DigestMemo(tmp_path / "m.sqlite", file_digest) as memo:
        old = memo.digest(f)
    # same size, content rewritten in place, mtime put back to the old value: ctime still tells
    st = os.stat(f)
    f.write_bytes(b"y" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    count = Counting()
    with DigestMemo(tmp_path / "m.sqlite", count) as memo:
        new = memo.digest(f)
    assert count.paths == [str(f)] and new == file_digest(f) != old
    # replaced by another file under the same name (new inode)
    g = _aged(_write(tmp_path / "b.bin", b"z" * 100))
    os.replace(g, f)
    with DigestMemo(tmp_path / "m.sqlite", count) as memo:
        assert memo.digest(f) == file_digest(f) and memo.misses == 1


def test_racy_files_are_not_memoised(tmp_path):
    f = _write(tmp_path / "fresh.bin", b"just written")  # mtime and ctime within RACY_S of now
    for _ in range(2):
        count = Counting()
        with DigestMemo(tmp_path / "m.sqlite", count) as memo:
            assert memo.digest(f) == file_digest(f)
        assert count.paths == [str(f)]  # read both times: its stat cannot vouch for its content yet


def test_a_broken_memo_falls_back_to_hashing(tmp_path, caplog):
    f = _write(tmp_path / "a.bin", b"data")
    bad = tmp_path / "m.sqlite"
    bad.write_bytes(b"this is not an sqlite database" * 100)
    with caplog.at_level(logging.WARNING, logger="selflabel.digests"):
        with DigestMemo(bad, file_digest) as memo:
            assert memo.digest(f) == file_digest(f)
    assert "unusable" in caplog.text and "hashing every file" in caplog.text
    with DigestMemo(None, file_digest) as memo:  # disabled: just hashes
        assert memo.digest(f) == file_digest(f) and memo.hits == memo.misses == 0


def test_extract_features_second_run_reads_no_file(color_folder, cache_dir, monkeypatch):
    monkeypatch.setattr("selflabel.digests.RACY_S", 0.0)
    for p in color_folder.rglob("*.*"):
        _aged(p)
    recs = scan_folder(color_folder).records
    bb = create_backbone("tiny")
    kw = dict(batch_size=8, num_workers=0, cache_dir=cache_dir, show_progress=False)
    first = extract_features(recs, bb, **kw)
    assert (cache_dir / DIGEST_MEMO).is_file()
    reads = Counting()
    monkeypatch.setattr("selflabel.features.file_digest", reads)
    second = extract_features(recs, bb, **kw)
    assert reads.paths == [] and (second.n_computed, second.n_cached) == (0, 24)
    np.testing.assert_array_equal(first.features, second.features)
    rehashed = extract_features(recs, bb, rehash=True, **kw)  # backbone.rehash=true: every file read again
    assert len(reads.paths) == 24 and rehashed.n_cached == 24


def test_non_utf8_and_unicode_file_names(tmp_path, monkeypatch):
    monkeypatch.setattr("selflabel.digests.RACY_S", 0.0)
    names = [os.fsdecode(b"caf\xe9.bin"), "caf\u00e9 \u65e5\u672c.bin"]  # latin-1 bytes (not UTF-8) and unicode
    files = [_aged(_write(tmp_path / n, n.encode("utf-8", "surrogateescape"))) for n in names]
    for _ in range(2):
        count = Counting()
        with DigestMemo(tmp_path / "m.sqlite", count) as memo:
            assert [memo.digest(f) for f in files] == [file_digest(f) for f in files]
    assert count.paths == []  # the second round came from the memo
