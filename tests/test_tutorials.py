"""The tutorial notebooks as committed: run in full, with their figures, stating what they promise.

CI executes every notebook with small settings (``tutorials/run.py --ci``); these tests check
the committed copies, which readers see on the code host and in the docs: every code cell ran,
in order, without an error, the figures are in the outputs, and the first cell states the
runtime, the data and what the reader should see.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _text(cell: dict, key: str = "source") -> str:
    value = cell.get(key, "")
    return "".join(value) if isinstance(value, list) else value


def test_there_are_four_tutorials():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"], [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_the_outputs_of_a_full_run(path):
    cells = _load(path)["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, f"{path.name}: cells {[i for i, n in enumerate(counts) if n is None]} never ran"
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: cells ran out of order or in pieces: {counts}"
    outputs = [o for c in code for o in c.get("outputs", [])]
    errors = [o for o in outputs if o["output_type"] == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no figure"
    settings = "".join(_text(o, "text") for o in code[0].get("outputs", []))
    assert "settings: full" in settings, f"{path.name}: the committed outputs must come from the full settings"
    warnings = [o for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr"]
    assert not warnings, f"{path.name} writes to stderr: {_text(warnings[0], 'text')[:300]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_states_runtime_data_and_what_to_see(path):
    first = _load(path)["cells"][0]
    assert first["cell_type"] == "markdown"
    text = _text(first)
    for promise in ("**Runtime**", "**Data**", "**You should see**"):
        assert promise in text, f"{path.name}: the first cell does not state {promise}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_reads_the_ci_switch(path):
    code = [_text(c) for c in _load(path)["cells"] if c["cell_type"] == "code"]
    assert "CAPTUM_INN_TUTORIAL_SETTINGS" in code[0], f"{path.name}: the first code cell must read the CI switch"


def test_a_failed_inplace_run_keeps_the_committed_outputs(tmp_path):
    """``run.py --inplace`` writes a notebook back only when it ran to the end."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tutorials_run", TUTORIALS / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('first')"),
                                               nbformat.v4.new_code_cell("raise ValueError('cell two fails')")])
    path, partial = tmp_path / "tutorial.ipynb", tmp_path / "runs" / "tutorial.ipynb"
    nbformat.write(notebook, path)
    committed = path.read_bytes()
    with pytest.raises(Exception, match="cell two fails"):
        run.run_notebook(path, "ci", path, limit=120, failed_out=partial)
    assert path.read_bytes() == committed
    assert "first" in json.dumps(_load(partial)["cells"][0]["outputs"])


def _run_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tutorials_run", TUTORIALS / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def test_a_notebook_over_the_whole_limit_keeps_the_committed_outputs(tmp_path):
    """nbclient bounds each cell: a notebook whose cells each finished in time but that ran past the limit
    in all was written back by ``--inplace`` before it was reported as failed."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    run = _run_module()
    cells = [nbformat.v4.new_code_cell("import time; time.sleep(1.6); print('slow')") for _ in range(2)]
    path, partial = tmp_path / "tutorial.ipynb", tmp_path / "runs" / "tutorial.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    committed = path.read_bytes()
    with pytest.raises(TimeoutError, match=r"over the limit of 3 s"):
        run.run_notebook(path, "ci", path, limit=3, failed_out=partial)
    assert path.read_bytes() == committed
    assert "slow" in json.dumps(_load(partial)["cells"][1]["outputs"])


@pytest.mark.parametrize("argv, environment, message", [
    (["--limit", "inf"], {}, r"--limit: must be a finite number of seconds >= 1, got 'inf'"),
    (["--limit", "0.5"], {}, r"--limit: must be a finite number of seconds >= 1"),  # nbclient: no limit at all
    ([], {"CAPTUM_INN_IMAGES": "/no/such/folder"}, r"CAPTUM_INN_IMAGES is '/no/such/folder', which is not a folder"),
])
def test_run_refuses_a_bad_limit_or_image_folder(monkeypatch, capsys, argv, environment, message):
    """``--limit inf`` failed every notebook with an OverflowError, 0.5 switched the cell limit off, and a
    mistyped CAPTUM_INN_IMAGES skipped the photo tutorial as if it were unset."""
    import re

    run = _run_module()
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        run.main(["--ci", *argv])
    assert stopped.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_notebooks_run_two_at_a_time_and_failures_are_reported(tmp_path, monkeypatch, capsys):
    """``run.py --jobs 2``: each kernel gets its share of the cores, a failing notebook is reported
    with the others and fails the run."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    import importlib.util
    import os
    import sys

    spec = importlib.util.spec_from_file_location("tutorials_run", TUTORIALS / "run.py")
    run = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tutorials_run", run)  # the worker processes find its functions by name
    spec.loader.exec_module(run)
    monkeypatch.setattr(run, "HERE", tmp_path)
    cells = {"a.ipynb": "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))",
             "b.ipynb": "raise ValueError('b fails')"}
    for name, code in cells.items():
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), tmp_path / name)
    assert run.main(["--ci", "--jobs", "2", "--limit", "120", "--out", str(tmp_path / "runs")]) == 1
    printed = capsys.readouterr()
    assert "FAIL b.ipynb" in printed.out and "b fails" in printed.out and "1 tutorial(s) failed" in printed.err
    assert "ok   a.ipynb" in printed.out
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"threads {threads}" in json.dumps(_load(tmp_path / "runs" / "a.ipynb")["cells"][0]["outputs"])
