"""The source distribution and the package metadata: what pip sees before anything is imported."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_sdist_carries_what_the_tests_read_and_states_the_python_it_needs(tmp_path):
    """The sdist held the test files but not conftest.py or the helpers they import, so its tests
    failed ("fixture 'device' not found"); it promised Python 3.9, where captum 0.9 cannot install."""
    # built from a copy of the project's files: setuptools also ships what an old egg-info's SOURCES.txt lists
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0 or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the project's files (an unpacked sdist has none)")
    files = listed.stdout.split()
    source = tmp_path / "source"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"builds with this environment's setuptools {setuptools.__version__}; pyproject.toml's "
                    "build-system needs 77 or newer (pip's build isolation fetches it)")
    build = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=source, check=True, capture_output=True, text=True)
    (archive,) = tmp_path.glob("captum_inn-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    for needed in ("conftest.py", "tests/helpers_training.py", "tests/helpers_hooks.py", "tests/ddp_fit_script.py",
                   "README.md", "docs/howto.rst", "docs/api.rst", "tutorials/01_what_does_my_cnn_ignore.ipynb",
                   "tutorials/run.py", "captum_inn/inn/_fast.py"):
        assert needed in names, needed
    assert not any(name.startswith(("docs/_build/", "docs/tutorials/")) or "__pycache__" in name for name in names)
    assert "Requires-Python: >=3.10" in info and "Requires-Dist: pillow>=9.1" in info
