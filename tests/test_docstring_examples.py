"""Every public name has a numpydoc docstring whose Examples run as written.

The public API is ``harmonypy.__all__`` (the ``datasets`` module: each of its
``__all__``) and the methods that docs/api.md lists for its classes. Each
object's examples run with doctest (ELLIPSIS and NORMALIZE_WHITESPACE on) in a
fresh working folder, with no names given in advance: an example imports what it
uses, as a reader copying it would. No example may be skipped, and docs/api.md
must document every public name (the Sphinx build then validates each docstring's
sections with numpydoc; see docs/conf.py).
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import harmonypy as hm

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _members_listed(class_name: str) -> list[str]:
    """The ``:members:`` that docs/api.md lists for ``class_name``."""
    text = API_PAGE.read_text(encoding="utf-8")
    match = re.search(rf"\.\. auto(?:class|exception):: {class_name}\n((?:   .*\n?|\s*\n)*)", text)
    assert match, f"docs/api.md does not document {class_name}"
    members = re.search(r":members:((?:.*\n?)(?:      .*\n?)*)", match[1])
    return re.findall(r"\w+", members[1]) if members else []


def _public_objects() -> dict[str, object]:
    objects: dict[str, object] = {}
    for name in hm.__all__:
        if name == "__version__":
            continue
        obj = getattr(hm, name)
        if name == "datasets":
            for function in obj.__all__:
                objects[f"datasets.{function}"] = getattr(obj, function)
            continue
        objects[name] = obj
        if isinstance(obj, type):
            for member in _members_listed(name):
                objects[f"{name}.{member}"] = getattr(obj, member)
    return objects


PUBLIC = _public_objects()


def _examples(name: str, obj: object) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=False)
    return [test for test in finder.find(obj, name=name, globs={}) if test.examples]


def test_api_page_documents_every_public_name():
    text = API_PAGE.read_text(encoding="utf-8")
    for name in hm.__all__:
        if name == "__version__":
            assert ".. data:: __version__" in text
        elif name == "datasets":
            for function in hm.datasets.__all__:
                assert f"autofunction:: harmonypy.datasets.{function}\n" in text, function
        else:
            assert re.search(rf"\.\. auto\w+:: {name}\n", text), name


@pytest.fixture
def one_thread():
    """Examples run on one torch thread, as the package itself runs problems this
    small: a step called by hand (``ho.init_cluster()``) is outside the run's thread
    policy and would use every core, which on a loaded machine is many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_examples_run(name, tmp_path, monkeypatch, one_thread):
    obj = PUBLIC[name]
    doc = obj.__doc__ or ""
    assert "Examples\n" in doc, f"{name}'s docstring has no Examples section"
    assert "+SKIP" not in doc, f"{name}'s docstring skips an example"
    tests = _examples(name, obj)
    assert tests, f"{name}'s Examples section has no doctest example"
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} example(s) of {name} failed (output above)"
