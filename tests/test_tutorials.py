"""Every tutorial runs top to bottom as a script, in quick mode, and its final check
passes.

A tutorial (tutorials/0N_*.py, percent format) ends in a cell of asserts that fail if
the idea it teaches is wrong, and prints "0N: all checks passed" after them. Each one
runs here in a fresh interpreter with MINILARS_QUICK=1 and its plots written to a
temporary MINILARS_TUTORIAL_OUT, exactly as a reader would run it from the shell.
Those that load SmolLM2-135M are marked real_model (CI runs them too; the session
fixture pulls the model into the cache once, before the subprocess needs it).
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TUTORIALS = REPO / "tutorials"
REAL_MODEL = {"04_lars.py", "05_finetune_in_1gib.py"}  # load_pretrained("smollm2-135m")
NEEDS = {"07_lars_on_transformers.py": ("torch", "transformers", "peft")}  # minilars[hf]; skipped without
TIMEOUT_S = 900  # generous: CI machines are shared; quick mode is meant to take well under this


def tutorial_paths() -> list[Path]:
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


def params() -> list:
    """One pytest.param per tutorial, marked slow (and real_model where it loads SmolLM2)."""
    return [pytest.param(path, marks=[pytest.mark.slow] + ([pytest.mark.real_model] if path.name in REAL_MODEL else []),
                         id=path.stem)
            for path in tutorial_paths()]


def test_tutorials_are_numbered_and_listed_in_the_readme():
    paths = tutorial_paths()
    assert [p.name[:2] for p in paths] == [f"{i:02d}" for i in range(1, len(paths) + 1)], "numbered 01, 02, ... in order"
    readme = (TUTORIALS / "README.md").read_text()
    listed = re.findall(r"\b(\d\d_\w+\.py)\b", readme)
    assert sorted(set(listed), key=listed.index) == [p.name for p in paths], "README lists every tutorial, in order"


@pytest.mark.parametrize("path", tutorial_paths(), ids=lambda p: p.stem)
def test_tutorial_is_a_percent_notebook_that_ends_in_a_check(path):
    source = path.read_text()
    ast.parse(source)  # valid Python as a whole
    cells = re.split(r"^# %%.*$", source, flags=re.M)[1:]
    assert len(cells) >= 3, "percent format: cells start with '# %%'"
    assert source.count("# %% [markdown]") >= 2, "prose cells ('# %% [markdown]') explain the code"
    code_cells = [c for c, header in zip(cells, re.findall(r"^# %%.*$", source, flags=re.M))
                  if "[markdown]" not in header]
    last = code_cells[-1]
    assert "assert " in last and f"{path.name[:2]}: all checks passed" in last, "the last code cell is the check"


@pytest.mark.parametrize("path", params())
def test_tutorial_runs_and_its_check_passes(path, tmp_path, request):
    for module in NEEDS.get(path.name, ()):
        pytest.importorskip(module)
    if path.name in REAL_MODEL:
        request.getfixturevalue("smollm2_path")  # pulled into the cache once per session
    env = {**os.environ, "MINILARS_QUICK": "1", "MINILARS_TUTORIAL_OUT": str(tmp_path), "MPLBACKEND": "Agg"}
    # One BLAS thread unless the caller chose: on a shared machine OpenBLAS threads spin
    # while they wait for a core, and a tutorial's CPU time grows several times over.
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    output = proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    assert proc.returncode == 0, f"{path.name} failed:\n{output}"
    assert f"{path.name[:2]}: all checks passed" in proc.stdout, output
    if "savefig" in path.read_text():
        assert list(tmp_path.glob("*.png")), f"{path.name} saved no plot in MINILARS_TUTORIAL_OUT"
