"""The version has one source and sorts after the published harmonypy; the README
installs this package, not the one of the same name on the package index.

The wheel itself is tested as users get it by ``scripts/check_wheel.sh`` (a fresh
virtual environment, outside the checkout), which ``.ci/run`` calls.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import harmonypy as hm

ROOT = Path(__file__).resolve().parents[1]
# The newest harmonypy on the package index (the C++ package, 2.x): a release of this
# package must sort after it to be installable by name.
NEWEST_PUBLISHED = "2.1.0"


def test_installed_metadata_matches_the_package_version():
    installed = importlib.metadata.version("harmonypy")
    assert installed == hm.__version__, (
        f"installed metadata says {installed}, harmonypy.__version__ says {hm.__version__}: "
        "reinstall the checkout (pip install -e .) after changing the version"
    )


def test_console_script_prints_the_package_version():
    script = Path(sys.executable).with_name("harmonypy")
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable} (package not installed)")
    proc = subprocess.run(
        [str(script), "--version"], check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"harmonypy {hm.__version__}"


def test_version_sorts_after_the_published_harmonypy():
    version = pytest.importorskip("packaging.version")
    ours = version.Version(hm.__version__)
    assert ours > version.Version(NEWEST_PUBLISHED), ours
    assert str(ours) == hm.__version__, "the version is not in its normalized form"


def test_pyproject_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in config["project"], "a second copy of the version"
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["hatch"]["version"]["path"] == "src/harmonypy/__init__.py"


def test_changelog_names_the_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    top = re.search(r"^## .*$", text, re.MULTILINE)
    assert top is not None and "Unreleased" in top[0] and hm.__version__ in top[0], top


def test_readme_installs_this_package_not_the_index_one():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(
        r"^Installation\n-+\n(?P<body>.*?)^\S[^\n]*\n-+\n", text, re.MULTILINE | re.DOTALL
    )
    assert section is not None, "README.md has no Installation section"
    body = section["body"]
    commands = [
        line.split("#")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", body, re.DOTALL)
        for line in block.splitlines()
    ]
    installs = [c for c in commands if re.search(r"pip install\b.*harmonypy|pip install \.", c)]
    assert installs, "the Installation section shows no install command"
    for command in installs:
        # From the checkout (".", ".[extras]") or a built wheel, never by name from the index.
        assert re.search(r"pip install (-e )?\"?(\.|\S*\.whl)", command), command
    assert "docs/migrating.md" in body and NEWEST_PUBLISHED in body


# Without an optional extra, its feature fails with a message that names the extra to
# install. Each case: the extra, the modules hidden, and the call that needs them.
def _plot(tmp_path):
    hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", max_iter_harmony=1).plot_convergence()


def _ann(tmp_path):
    pcs, meta = hm.datasets.load_pbmcs_small()
    hm.compute_lisi(pcs.to_numpy()[:, :5], meta, ["donor"], neighbors="pynndescent")


def _cli(*words):
    def call(tmp_path):
        from harmonypy import cli

        status = cli.main(["--debug", *[w.format(tmp=tmp_path) for w in words]])
        raise AssertionError(f"harmonypy {' '.join(words)} exited with {status}, no error")

    return call


EXTRA_CASES = [
    ("plot", ["matplotlib"], _plot),
    ("ann", ["pynndescent"], _ann),
    ("anndata", ["anndata"], _cli("run", "{tmp}/in.h5ad", "--vars", "donor", "-o", "{tmp}/o.tsv")),
    (
        "parquet",
        ["pyarrow"],
        _cli("run", "{tmp}/pcs.parquet", "{tmp}/meta.tsv", "--vars", "donor", "-o", "{tmp}/o.tsv"),
    ),
]


@pytest.mark.parametrize("extra, hidden, call", EXTRA_CASES, ids=[c[0] for c in EXTRA_CASES])
def test_feature_without_its_extra_names_the_extra(extra, hidden, call, tmp_path, monkeypatch):
    for name in hidden:
        for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    for name in ("in.h5ad", "pcs.parquet", "meta.tsv"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ImportError, match=re.escape(f"pip install harmonypy[{extra}]")):
        call(tmp_path)


def test_ci_runs_the_readme_test_command_then_checks_the_wheel():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"The test suite itself is `([^`]+)`", readme)
    assert command is not None, "README.md no longer names the test command"
    lines = [line.split("#")[0].strip() for line in ci.splitlines()]
    tests = next(i for i, line in enumerate(lines) if line.endswith(command[1]))
    wheel = next(i for i, line in enumerate(lines) if "scripts/check_wheel.sh" in line)
    assert tests < wheel, "the wheel check runs before the README's test command"
