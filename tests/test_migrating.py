"""Every code example in docs/migrating.md runs as written, and its tables match the code.

As for README.md (``tests/test_readme.py``): each ```python block is executed
on its own, in a fresh namespace, in an empty working folder. Code for the
other packages (scanpy 1.13's native Harmony, harmonypy 0.2/2.x, R,
harmony-pytorch, rapids-singlecell) sits in ```text or ```r blocks, which are
not run; every fenced block must name one of those languages, so that no
example escapes the test by having no language.

The argument tables are checked against what they describe: the scanpy table
against ``SCANPY_TO_RUN_HARMONY`` and ``harmony_integrate``'s signature, and
the argument names of harmonypy 0.2.0 and 2.1.0 (read from their PyPI files
when the page was written) against ``run_harmony``'s signature.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import harmonypy as hm
from harmonypy.adapters.scanpy import SCANPY_TO_RUN_HARMONY

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrating.md"
TEXT = DOC.read_text(encoding="utf-8")
_FENCE = re.compile(r"^```(?P<lang>[A-Za-z]*)\n(?P<code>.*?)^```$", re.S | re.M)
_LANGUAGES = {"python", "text", "r"}
# Optional packages a block may import; a block that needs a missing one is skipped.
_OPTIONAL = ("anndata", "scanpy", "matplotlib")


def _blocks() -> list[tuple[str, int, str]]:
    return [
        (m["lang"], TEXT.count("\n", 0, m.start("code")) + 1, m["code"])
        for m in _FENCE.finditer(TEXT)
    ]


PYTHON_BLOCKS = [(line, code) for lang, line, code in _blocks() if lang == "python"]


def _table(heading: str) -> list[list[str]]:
    """Data rows (cells stripped) of the first Markdown table at or after ``heading``.

    ``heading`` is a section title above the table or the start of its header row.
    """
    start = TEXT.rindex("\n", 0, TEXT.index(heading)) + 1
    rows = []
    for line in TEXT[start:].splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and separator


def _names(cell: str) -> list[str]:
    """Identifiers quoted in a cell: `name` or `name=value`."""
    return re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=[^`]*)?`", cell)


# ---------------------------------------------------------------- examples
def test_page_has_examples_and_every_block_names_its_language():
    blocks = _blocks()
    assert len(PYTHON_BLOCKS) >= 10
    odd = [(line, lang) for lang, line, _ in blocks if lang not in _LANGUAGES]
    assert not odd, f"fenced blocks must be python, text or r: {odd}"
    assert TEXT.count("```") == 2 * len(blocks), "an unmatched code fence"


@pytest.mark.parametrize(
    "line, code", PYTHON_BLOCKS, ids=[f"migrating.md:{line}" for line, _ in PYTHON_BLOCKS]
)
def test_python_example_runs(line, code, tmp_path, monkeypatch):
    for module in _OPTIONAL:
        if re.search(rf"^\s*(import|from) {module}\b", code, re.M):
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__migrating__"}
    exec(compile(code, f"migrating.md:{line}", "exec"), namespace)


def test_no_python_block_calls_another_package():
    """Other packages' calls stay in text/r blocks or comments, never in run code."""
    foreign = re.compile(r"\b(sc\.pp\.harmony_integrate|sce\.pp\.|rsc\.|harmonize\()")
    offenders = [
        line
        for line, code in PYTHON_BLOCKS
        if any(foreign.search(row.split("#", 1)[0]) for row in code.splitlines())
    ]
    assert not offenders, f"python blocks at lines {offenders} call another package"


# ------------------------------------------------------------------ tables
def test_scanpy_table_is_the_code_table():
    rows = _table("#### Names")
    table = {_names(row[0])[0]: _names(row[1]) for row in rows}
    for scanpy_name, (target, _) in SCANPY_TO_RUN_HARMONY.items():
        assert table.get(scanpy_name) == [target], (scanpy_name, table.get(scanpy_name), target)
    # Every parameter of hm.harmony_integrate has a row, and nothing else does.
    assert set(table) == set(inspect.signature(hm.harmony_integrate).parameters)
    assert table["flavor"] == ["algorithm"]
    for name in ("basis", "adjusted_basis", "correction_method"):
        assert table[name] == [], name


def test_scanpy_defaults_quoted_on_the_page_are_the_functions():
    parameters = inspect.signature(hm.harmony_integrate).parameters
    assert parameters["max_iter_clustering"].default == 200
    assert parameters["tol_harmony"].default == 1e-4
    assert parameters["tol_clustering"].default == 1e-5
    assert parameters["flavor"].default == "harmony2"
    assert parameters["rng"].default is None
    assert 'README, "Performance", has the table' in TEXT  # speed figures point to README


# Signatures of the PyPI releases, read from harmonypy-0.2.0-py3-none-any.whl and
# harmonypy-2.1.0.tar.gz (harmonypy/harmony.py) when the page was written.
HARMONYPY_020 = [
    "data_mat",
    "meta_data",
    "vars_use",
    "theta",
    "lamb",
    "sigma",
    "nclust",
    "tau",
    "block_size",
    "max_iter_harmony",
    "max_iter_kmeans",
    "epsilon_cluster",
    "epsilon_harmony",
    "alpha",
    "verbose",
    "random_state",
    "device",
]
HARMONYPY_210 = [
    "data_mat",
    "meta_data",
    "vars_use",
    "theta",
    "lamb",
    "sigma",
    "nclust",
    "tau",
    "block_size",
    "max_iter_harmony",
    "max_iter_kmeans",
    "epsilon_cluster",
    "epsilon_harmony",
    "alpha",
    "batch_prop_cutoff",
    "verbose",
    "random_state",
    "ncores",
]


def test_every_old_harmonypy_argument_exists_here():
    parameters = list(inspect.signature(hm.run_harmony).parameters)
    for name in HARMONYPY_020 + HARMONYPY_210:
        assert name in parameters, name
    # The page's warning about positional order: 0.2.0's order is kept here ...
    assert parameters[: len(HARMONYPY_020)] == HARMONYPY_020
    # ... and 2.1.0's departs from it after alpha.
    assert parameters[:14] == HARMONYPY_210[:14]
    assert parameters[14] != HARMONYPY_210[14]


def test_harmonypy_argument_table_names_exist():
    rows = _table("### Arguments\n\n| argument | harmonypy 0.2.0")
    names = [name for row in rows for name in _names(row[0])]
    parameters = inspect.signature(hm.run_harmony).parameters
    assert names, "the harmonypy argument table was not found"
    assert [n for n in names if n not in parameters] == []


def test_r_table_targets_exist():
    rows = _table("| R (`RunHarmony`, `harmony_options`)")
    parameters = set(inspect.signature(hm.run_harmony).parameters)
    parameters |= set(inspect.signature(hm.integrate).parameters)
    targets = [name for row in rows for name in _names(row[3])]
    assert targets
    assert [n for n in targets if n not in parameters] == []
