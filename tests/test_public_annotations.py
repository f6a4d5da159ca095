"""The public API is fully annotated, and ships its types (PEP 561).

Every function in ``harmonypy.__all__`` (and in the public ``datasets`` module)
and every public method of the public classes annotates each parameter and its
return value, so that a type checker (mypy over ``src/`` with the config in
pyproject.toml, see CONTRIBUTING.md) checks callers against them.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import harmonypy as hm


def _callables():
    for name in hm.__all__:
        obj = getattr(hm, name)
        if inspect.ismodule(obj):
            for attr in getattr(obj, "__all__", []):
                yield f"{name}.{attr}", getattr(obj, attr)
        elif inspect.isclass(obj):
            if issubclass(obj, Warning):
                continue
            # The class's own members and those it inherits from the package's own
            # bases (Harmony's results come from engine/harmony_results.HarmonyResults).
            own = [c for c in reversed(obj.__mro__) if c.__module__.startswith("harmonypy")]
            members = {attr: m for c in own for attr, m in vars(c).items()}
            for attr, member in members.items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, property):
                    member = member.fget
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    yield f"{name}.{attr}", member
        elif inspect.isfunction(obj):
            yield name, obj


def _missing(func) -> list[str]:
    """Parameters (and 'return') of ``func`` without an annotation."""
    sig = inspect.signature(func, follow_wrapped=False)  # datasets.simulate's own signature
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")
    ]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


PUBLIC = dict(_callables())


def test_the_public_callables_are_found():
    expected = {"run_harmony", "Harmony.result", "Harmony.harmonize", "MappedQuery.__init__"}
    assert expected | {"datasets.simulate"} <= set(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_callable_is_fully_annotated(name):
    assert _missing(PUBLIC[name]) == [], f"{name}: no annotation for {_missing(PUBLIC[name])}"


def test_the_package_says_it_is_typed():
    assert (Path(hm.__file__).parent / "py.typed").is_file()
