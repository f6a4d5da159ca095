"""Every code example of the pages in docs/ runs as written.

A page is read as a notebook: its ```python blocks run in order in one
namespace, in a fresh working folder that holds the bundled example files
(``harmonypy example-data .``: ``pcs.tsv.gz``, ``meta.tsv.gz``, unless the
example writes them itself) and
``adata.h5ad`` (the same cells as AnnData, ``obsm["X_pca"]`` and ``obs``). In
each ```bash block the lines that run this package (``harmonypy ...`` through
``python -m harmonypy``, ``torchrun ... -m harmonypy.shard`` through
``python -m torch.distributed.run``, one-line ``python -c``) run in order in
such a folder; other shell lines (installs, benchmarks) are not run. A block opts out
with ``<!-- readme-test: skip -->`` on the line before its fence (counted below, so
that it stays rare).

Pages with a test of their own are not run twice: migrating.md
(tests/test_migrating.py), mapping-tutorial.md (tests/mapping/test_mapping.py and
tests/cli/test_cli_mapping.py) and convergence.md (tests/engine/test_convergence.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from harmonypy.cli import main as cli_main

DOCS = Path(__file__).resolve().parents[1] / "docs"
TESTED_ELSEWHERE = {"migrating.md", "mapping-tutorial.md", "convergence.md"}
PAGES = sorted(p.name for p in DOCS.glob("*.md") if p.name not in TESTED_ELSEWHERE)
_FENCE = re.compile(
    r"(?P<skip><!-- readme-test: skip -->\n)?```(?P<lang>[a-z]*)\n"
    r"(?P<code>.*?)```",
    re.S,
)

#: What a page's text says its examples start from, built before its blocks run.
#: mapping.md's AnnData examples use the reference and query of
#: mapping-tutorial.md's "From genes (AnnData)" section, as the page says.
SETUP = {"mapping.md": "adata_pages"}


def _blocks(page: str, lang: str) -> list[tuple[int, str]]:
    text = (DOCS / page).read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start("code")) + 1, m["code"])
        for m in _FENCE.finditer(text)
        if m["lang"] == lang and not m["skip"]
    ]


def _harmonypy_commands(code: str) -> list[list[str]]:
    """The command lines of a shell block that run this package, as argument lists
    after the Python interpreter: ``harmonypy ...`` (as ``-m harmonypy``),
    ``torchrun ... -m harmonypy.shard`` (as ``-m torch.distributed.run``) and
    one-line ``python -c "...harmonypy..."``; comments removed. Other lines
    (installs, benchmarks) are not run."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a quoted string that goes on over several lines
            continue
        if words[:1] == ["harmonypy"]:
            commands.append(["-m", "harmonypy", *words[1:]])
        elif words[:1] == ["torchrun"] and "harmonypy.shard" in words:
            commands.append(["-m", "torch.distributed.run", *words[1:]])
        elif words[:2] == ["python", "-c"] and "harmonypy" in words[2]:
            commands.append(words[1:])
    return commands


def _example_folder(folder: Path, code: str) -> None:
    """The example files a page may use, as ``harmonypy example-data`` writes them,
    unless the example writes them itself."""
    import anndata as ad

    import harmonypy as hm

    if "example-data" not in code and "save_example(" not in code:
        hm.datasets.save_example(str(folder))
    pcs, meta = hm.datasets.load_pbmcs_small()
    adata = ad.AnnData(obs=meta.set_index("cell_id"), obsm={"X_pca": pcs.to_numpy()})
    adata.write_h5ad(folder / "adata.h5ad")


def _adata_pages(namespace: dict) -> None:
    """``adata`` (a reference with genes, PCA and scaling) and ``adata_query``, from
    the AnnData block of mapping-tutorial.md."""
    import numpy as np
    import pandas as pd

    import harmonypy as hm

    blocks = _blocks("mapping-tutorial.md", "python")
    code = next(code for _, code in blocks if "sc.pp.pca(reference" in code)
    scratch = {"np": np, "pd": pd, "hm": hm, "__name__": "__docs__"}
    exec(compile(code, "mapping-tutorial.md", "exec"), scratch)
    import scanpy as sc

    adata = namespace["adata"] = scratch["simulate"](600, [0, 1], seed=1)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.scale(adata, max_value=10)
    sc.pp.pca(adata, n_comps=15)
    query = scratch["simulate"](300, [2], seed=2)
    sc.pp.normalize_total(query, target_sum=1e4)
    sc.pp.log1p(query)
    namespace["adata_query"] = query
    namespace["new_cells"] = query.copy()
    namespace["hm"] = hm


def test_docs_have_examples():
    assert "index.md" in PAGES and "usage.md" in PAGES
    blocks = sum(len(_blocks(page, "python")) for page in PAGES)
    assert blocks >= 15
    skipped = sum(
        (DOCS / page).read_text(encoding="utf-8").count("<!-- readme-test: skip -->")
        for page in PAGES
    )
    assert skipped <= 1, "too many docs examples opt out of the test"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    headings += re.findall(r"^(.+)\n-{3,}$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_index_links_every_page():
    """docs/index.md links every page of docs/, and every relative link of the README and
    docs/ leads to a file that exists and, with '#', to a heading of it."""
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in sorted(p.name for p in DOCS.glob("*.md")):
        if page != "index.md":
            assert f"]({page})" in index, f"docs/index.md does not link {page}"
    for page in [*DOCS.glob("*.md"), DOCS.parent / "README.md"]:
        text = page.read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([^)#:]*\.(?:md|png))(?:#([^)]*))?\)", text):
            path = page.parent / target
            assert path.exists(), f"{page.name} links to missing {target}"
            if anchor:
                assert anchor in _anchors(path), f"{page.name} links to {target}#{anchor}"


def test_usage_parameter_table_is_the_signature():
    """docs/usage.md's table lists run_harmony's parameters, in order, with their defaults."""
    import inspect

    import harmonypy as hm

    text = (DOCS / "usage.md").read_text(encoding="utf-8")
    start = text.index("| parameter | default |")
    table = text[start : text.index("\n\n", start)]
    rows = re.findall(r"^\| `(\w+)` \| ?(`[^`]*`)? ?\|", table, re.M)
    parameters = inspect.signature(hm.run_harmony).parameters
    assert [name for name, _ in rows] == list(parameters)
    for name, default in rows:
        expected = parameters[name].default
        if expected is inspect.Parameter.empty:
            assert default == "", name
        else:
            assert default == f"`{expected!r}`", (name, default, expected)


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "python")])
def test_python_examples_run(page, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    _example_folder(tmp_path, "".join(code for _, code in _blocks(page, "python")))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    if SETUP.get(page) == "adata_pages":
        _adata_pages(namespace)
    for line, code in _blocks(page, "python"):
        exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)


BASH_BLOCKS = [
    (page, line, cmds)
    for page in PAGES
    for line, code in _blocks(page, "bash")
    if (cmds := _harmonypy_commands(code))
]


@pytest.mark.parametrize(
    "page, line, commands", BASH_BLOCKS, ids=[f"{page}:{line}" for page, line, _ in BASH_BLOCKS]
)
def test_command_line_examples_run(page, line, commands, tmp_path, monkeypatch, capsys):
    _example_folder(tmp_path, " ".join(" ".join(words) for words in commands))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for words in commands:
        if words[:2] == ["-m", "harmonypy"]:
            # `harmonypy ...` runs the command line's own entry point in this
            # process: the same code as the console script, without paying a
            # fresh interpreter's import of torch (~1.6 s) per command.
            monkeypatch.chdir(tmp_path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                status = cli_main(words[2:])
            assert status == 0, (
                f"docs/{page}:{line}: harmonypy {shlex.join(words[2:])} exited with "
                f"{status}:\n{capsys.readouterr().err}"
            )
            continue
        result = subprocess.run(
            [sys.executable, *words],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, (
            f"docs/{page}:{line}: python {shlex.join(words)} exited with "
            f"{result.returncode}:\n{result.stderr}"
        )
