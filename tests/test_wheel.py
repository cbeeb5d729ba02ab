"""The wheel built from the repository ships the package, its configs and the sample photos."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contains_the_configs(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    if not files or files == [b""]:
        pytest.skip("not a git checkout")
    for f in files:  # the tracked files only: a clean tree, as a fresh clone
        rel = f.decode()
        if not rel or not (REPO / rel).exists():
            continue
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / rel).is_symlink():
            dst.symlink_to((REPO / rel).readlink())
        elif (REPO / rel).is_file():
            dst.write_bytes((REPO / rel).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "--wheel-dir", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("selflabel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(n for n in names if n.startswith("selflabel/configs/"))
    repo_configs = sorted(f"selflabel/configs/{p.name}" for p in (REPO / "selflabel" / "configs").glob("*.yaml"))
    assert configs == repo_configs and "selflabel/configs/default.yaml" in configs
    with zipfile.ZipFile(wheel) as z:
        for n in configs:
            assert isinstance(yaml.safe_load(z.read(n)), dict), n
    assert {"selflabel/__init__.py", "selflabel/api.py", "selflabel/geometry.py", "selflabel/methods.py"} <= names
    assert sum(n.startswith("selflabel/sample/imagenette/") for n in names) == 100
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
