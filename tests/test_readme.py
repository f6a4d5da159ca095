"""Every code example in README.md runs as written.

Each ```python block is executed on its own (a user copies one block, not the
page), in a fresh namespace, in an empty working folder. In each ```bash block
the lines that call ``harmonypy`` are run in order, in their own empty folder,
through ``python -m harmonypy``; other shell lines (installs, benchmarks) are
not run. A block can opt out with an HTML comment ``<!-- readme-test: skip -->``
on the line before its opening fence, which this test counts so that opting out
stays rare and visible.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(
    r"(?P<skip><!-- readme-test: skip -->\n)?```(?P<lang>python|bash)\n"
    r"(?P<code>.*?)```",
    re.S,
)


def _blocks(lang: str) -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        if match["lang"] == lang and not match["skip"]:
            line = text.count("\n", 0, match.start("code")) + 1
            found.append((line, match["code"]))
    return found


def _harmonypy_commands(code: str) -> list[list[str]]:
    """The ``harmonypy ...`` command lines of a shell block, comments removed."""
    commands = []
    logical = code.replace("\\\n", " ")
    for line in logical.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "harmonypy":
            commands.append(words[1:])
    return commands


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = [
    (line, cmds) for line, code in _blocks("bash") if (cmds := _harmonypy_commands(code))
]


def test_readme_has_examples():
    assert len(PYTHON_BLOCKS) >= 4  # integrate, score, map, AnnData/scanpy
    assert BASH_BLOCKS
    skipped = README.read_text(encoding="utf-8").count("<!-- readme-test: skip -->")
    assert skipped <= 2, "too many README examples opt out of this test"


@pytest.mark.parametrize(
    "line, code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS]
)
def test_python_example_runs(line, code, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def test_first_example_converges(tmp_path, monkeypatch, capsys):
    """The first example runs Harmony to convergence with the parameters it
    shows: its last progress line says so, not "without converging"."""
    line, code = PYTHON_BLOCKS[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    ho = namespace["ho"]
    assert ho.converged and 10 < ho.n_iter < 20, ho.n_iter  # as the text after it says
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "converged" in last and "without converging" not in last, last
    objective = ho.objective_harmony
    assert 1e-4 < (objective[9] - objective[10]) / objective[9] < 5e-4  # "about 0.02 %"
    import numpy as np

    import harmonypy as hm

    capped = hm.run_harmony(*hm.datasets.load_pbmc_3500()[:2], ["donor"], verbose=False)
    assert not capped.converged
    r = [np.corrcoef(capped.Z_corr[j], ho.Z_corr[j])[0, 1] for j in range(ho.d)]
    assert min(r) > 0.999


@pytest.mark.parametrize(
    "line, commands", BASH_BLOCKS, ids=[f"README.md:{line}" for line, _ in BASH_BLOCKS]
)
def test_command_line_example_runs(line, commands, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for words in commands:
        result = subprocess.run(
            [sys.executable, "-m", "harmonypy", *words],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, (
            f"README.md:{line}: harmonypy {shlex.join(words)} exited with "
            f"{result.returncode}:\n{result.stderr}"
        )
