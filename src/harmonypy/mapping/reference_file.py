"""Reading a reference file back: :func:`load_reference` and its checks.

:meth:`~harmonypy.mapping.reference.Reference.save` writes a versioned ``.npz`` file
(arrays only, never a pickle) whose layout ``docs/mapping.md`` lists key by
key; :func:`load_reference` reads it back bit for bit and refuses anything
else with a :class:`ReferenceFileError` that names the file and the field or
array. It checks the file before reading any array (every metadata field;
each array's declared dtype and shape, from its ``.npy`` header, against what
the metadata implies; each member's declared size against its bytes, through
``harmonypy.mapping.npzfile``), so that a small corrupt file cannot make it allocate
more than a valid file of that metadata would.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pandas as pd

from harmonypy.engine import memory as _memory
from harmonypy.engine import validation as val
from harmonypy.mapping.npzfile import NpzArchive
from harmonypy.mapping.projection import SCALINGS, GeneProjection
from harmonypy.mapping.reference import (
    ALGORITHMS,
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_KEY,
    ONE_BATCH,
    Reference,
)

__all__ = ["ReferenceFileError", "load_reference"]


class ReferenceFileError(ValueError):
    """A reference file that cannot be loaded, with the file in ``path``.

    Raised for a file that is not a readable ``.npz``, not a harmonypy
    reference, or corrupt: a metadata field of the wrong type or range, an
    array whose declared dtype or shape disagrees with the metadata, a member
    larger than its data can hold, non-finite or out-of-range values. The
    message names the file, then the field or array and what was expected.
    """

    def __init__(self, path: str | Path, message: str):
        super().__init__(f"reference file {str(path)!r} {message}")
        self.path = Path(path)


#: Largest metadata entry read (JSON text; a reference's is a few kB).
_MAX_METADATA_BYTES = 64 * 2**20
#: Kinds of NumPy dtype a label column's categories may have.
_CATEGORY_KINDS = "Uiufbmm"


def load_reference(path: str | Path) -> Reference:
    """Read a reference written by :meth:`Reference.save`.

    The file is checked before any array is read: its metadata field by
    field (type, shape, range), then each array's ``.npy`` header against
    the dtype and shape the metadata implies, each member's declared size
    against its bytes in the file (a compressed member is inflated only up
    to its declared size), and the total against the memory available.
    The values are checked once read: finite, in range, counts consistent.
    Only arrays are read, never a pickle: loading a file cannot run code.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file.

    Returns
    -------
    Reference
        The reference as it was saved.

    Raises
    ------
    FileNotFoundError
        No such file.
    IsADirectoryError
        ``path`` is a folder.
    ReferenceFileError
        (a ``ValueError``) A file that is not a readable ``.npz`` (truncated,
        corrupt, another format), an ``.npz`` that is not a harmonypy
        reference, a reference written by a newer format version, or a
        corrupt one. Its ``path`` is the file; the message names the file
        and the metadata field or array.
    MemoryError
        The arrays the file declares (consistently) exceed the memory
        available; the message names the file.

    Examples
    --------
    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> ho = hm.run_harmony(pcs, meta, "donor", verbose=False)
    >>> path = hm.build_reference(ho, meta, labels="cell_type").save("reference.npz")
    >>> ref = hm.load_reference(path)
    >>> ref.n_cells, ref.label_columns
    (1200, ['cell_type'])
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference file {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(
            f"reference file {str(path)!r} is a folder; expected a .npz "
            f"file written by Reference.save"
        )
    problem = functools.partial(ReferenceFileError, path)
    with open(path, "rb") as handle:
        if handle.read(6) == b"\x93NUMPY":
            raise problem("is a single .npy array, not a .npz harmonypy reference")
    with NpzArchive(path, problem) as archive:
        metadata = _read_metadata(archive, problem)
        headers = _checked_headers(archive, metadata, problem)
        _check_memory(path, sum(header.nbytes for header in headers.values()))
        arrays = {key: archive.read(header) for key, header in headers.items()}
    _check_values(arrays, metadata, problem)
    return _from_arrays(arrays, metadata)


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _read_metadata(archive, problem) -> dict:
    """The JSON metadata, every field checked (:func:`_check_metadata`)."""
    if METADATA_KEY not in archive.keys:
        raise problem(
            f"is not a harmonypy reference: it has no {METADATA_KEY!r} entry "
            f"(entries: {sorted(archive.keys)[:8]})"
        )
    header = archive.header(METADATA_KEY)
    if header.dtype != np.uint8 or len(header.shape) != 1:
        raise problem(
            f"is not a harmonypy reference: its {METADATA_KEY!r} entry is "
            f"{header.dtype} {header.shape}, not UTF-8 bytes"
        )
    if header.nbytes > _MAX_METADATA_BYTES:
        raise problem(
            f"has {header.nbytes:,} bytes of metadata, more than a reference's "
            f"(at most {_MAX_METADATA_BYTES:,} are read); the file is corrupt"
        )
    raw = archive.read(header)
    try:
        metadata = json.loads(
            raw.tobytes().decode("utf-8"), parse_float=_finite_float, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise problem(f"has unreadable metadata ({_reason(err)}); the file is corrupt") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise problem(f"is not a harmonypy reference (format {found!r}, expected {FORMAT_NAME!r})")
    version = metadata.get("format_version")
    if not _is_int(version) or version < 1:
        raise problem(f"has an invalid format_version {version!r}; expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise problem(
            f"was written in format version {version} (harmonypy "
            f"{metadata.get('harmonypy_version', '?')}), newer than this harmonypy "
            f"reads (up to version {FORMAT_VERSION}): upgrade harmonypy to load it"
        )
    required = (
        "algorithm",
        "n_clusters",
        "n_dims",
        "n_cells",
        "dtype",
        "parameters",
        "variables",
        "levels",
        "label_columns",
        "arrays",
    )
    missing = [key for key in required if key not in metadata]
    if missing:
        raise problem(f"has incomplete metadata: missing {missing}")
    _check_metadata(metadata, problem)
    return metadata


# ------------------------------------------------------------ metadata checks
def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    """A finite JSON number (not a boolean)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value) -> bool:
    """A list of numbers, non-finite ones written as text (as :func:`_json_value` does)."""
    return isinstance(value, list) and all(_is_number(v) or v in ("inf", "-inf") for v in value)


def _field(problem, name: str, value, expected: str) -> Exception:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return problem(f"has an invalid metadata field {name!r}: {text}; expected {expected}")


#: Each known run parameter: (check, what is expected). Unknown ones are kept as they are.
_PARAMETERS = {
    "theta": (_numbers, "a list of numbers"),
    "lamb": (_numbers, "a list of numbers"),
    "lamb_estimated": (lambda v: isinstance(v, bool), "true or false"),
    "converged": (lambda v: isinstance(v, bool), "true or false"),
    "alpha": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "batch_prop_cutoff": (
        lambda v: v is None or (_is_number(v) and 0 <= v <= 1),
        "null or a number in [0, 1]",
    ),
    "block_size": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "epsilon_cluster": (lambda v: _is_number(v) or v == "-inf", 'a number or "-inf"'),
    "epsilon_harmony": (lambda v: _is_number(v) or v == "-inf", 'a number or "-inf"'),
    "nclust": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_iter_kmeans": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "soft_kmeans_rounds": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "n_iter": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "random_state": (_is_int, "an integer"),
}


def _check_metadata(metadata: dict, problem) -> None:
    """Every field of the metadata: type, range, and agreement with the others."""
    if metadata["algorithm"] not in ALGORITHMS:
        raise problem(
            f"names an unknown algorithm {metadata['algorithm']!r}; expected one of {ALGORITHMS}"
        )
    for name in ("n_clusters", "n_dims", "n_cells"):
        if not _is_int(metadata[name]) or metadata[name] < 1:
            raise _field(problem, name, metadata[name], "an integer >= 1")
    if metadata["n_clusters"] > metadata["n_cells"]:
        raise _field(
            problem,
            "n_clusters",
            metadata["n_clusters"],
            f"at most n_cells = {metadata['n_cells']} (clusters of the reference cells)",
        )
    if metadata["dtype"] not in ("float32", "float64"):
        raise _field(problem, "dtype", metadata["dtype"], "'float32' or 'float64'")
    for name in ("harmonypy_version", "basis", "adjusted_basis"):
        if name in metadata and not isinstance(metadata[name], str):
            raise _field(problem, name, metadata[name], "text")
    arrays = metadata["arrays"]
    if (
        not isinstance(arrays, list)
        or not all(isinstance(a, str) for a in arrays)
        or len(set(arrays)) != len(arrays)
    ):
        raise _field(problem, "arrays", arrays, "a list of distinct array names")
    _check_batches(metadata, problem)
    _check_parameters(metadata, problem)
    columns = metadata["label_columns"]
    if not isinstance(columns, list) or not all(
        isinstance(c, dict)
        and isinstance(c.get("name"), str)
        and isinstance(c.get("ordered", False), bool)
        for c in columns
    ):
        raise _field(
            problem, "label_columns", columns, 'a list of {"name": text, "ordered": true or false}'
        )
    names = [c["name"] for c in columns]
    if len(set(names)) != len(names):
        raise _field(problem, "label_columns", names, "distinct column names")
    _check_projection_metadata(metadata.get("projection"), problem)


def _check_batches(metadata: dict, problem) -> None:
    """``variables`` and ``levels``: one list of distinct levels per distinct variable."""
    variables, levels = metadata["variables"], metadata["levels"]
    if (
        not isinstance(variables, list)
        or not all(isinstance(v, str) for v in variables)
        or len(set(variables)) != len(variables)
    ):
        raise _field(problem, "variables", variables, "a list of distinct variable names")
    if (metadata["algorithm"] == ONE_BATCH) != (not variables):
        raise _field(
            problem,
            "variables",
            variables,
            "[] for a one-batch reference (algorithm 'none'), at least one variable "
            "for a Harmony reference",
        )
    if not isinstance(levels, list) or len(levels) != len(variables):
        raise _field(
            problem,
            "levels",
            levels,
            f"a list of {len(variables)} list(s) of levels, one per variable",
        )
    for i, values in enumerate(levels):
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, (str, int, float)) for v in values)
            or len({str(v) for v in values}) != len(values)
        ):
            raise _field(
                problem,
                f"levels[{i}]",
                values,
                f"the levels of variable {variables[i]!r}: a non-empty list of "
                f"distinct texts, numbers or booleans",
            )


def _check_parameters(metadata: dict, problem) -> None:
    """The run's parameters that are known, by :data:`_PARAMETERS`; lengths of the
    per-level ``theta`` (B) and ``lamb`` (B + 1)."""
    parameters = metadata["parameters"]
    if not isinstance(parameters, dict):
        raise _field(problem, "parameters", parameters, "a JSON object")
    for name, (check, expected) in _PARAMETERS.items():
        if name in parameters and not check(parameters[name]):
            raise _field(problem, f"parameters.{name}", parameters[name], expected)
    if metadata["algorithm"] == "harmony2" and not _is_number(parameters.get("batch_prop_cutoff")):
        raise _field(
            problem,
            "parameters.batch_prop_cutoff",
            parameters.get("batch_prop_cutoff"),
            "a number in [0, 1] (a Harmony2 reference's mapping uses it)",
        )
    n_levels = sum(len(values) for values in metadata["levels"])
    for name, size, what in (
        ("theta", n_levels, "one per batch level"),
        ("lamb", n_levels + 1, "the intercept's, then one per level"),
    ):
        if metadata["variables"] and name in parameters and len(parameters[name]) != size:
            raise _field(
                problem, f"parameters.{name}", parameters[name], f"{size} numbers ({what})"
            )
    if "nclust" in parameters and parameters["nclust"] != metadata["n_clusters"]:
        raise _field(
            problem,
            "parameters.nclust",
            parameters["nclust"],
            f"n_clusters = {metadata['n_clusters']}",
        )


def _check_projection_metadata(info, problem) -> None:
    if info is None:
        return
    if not isinstance(info, dict) or info.get("scaling") not in SCALINGS:
        raise _field(
            problem,
            "projection",
            info,
            f'{{"scaling": one of {sorted(SCALINGS)}, "n_genes": ..., "clip": ...}}',
        )
    if not _is_int(info.get("n_genes")) or info["n_genes"] < 1:
        raise _field(problem, "projection.n_genes", info.get("n_genes"), "an integer >= 1")
    clip = info.get("clip")
    if clip is not None and (
        not isinstance(clip, list)
        or len(clip) != 2
        or not all(_is_number(v) for v in clip)
        or clip[0] > clip[1]
    ):
        raise _field(problem, "projection.clip", clip, "null or [low, high], low <= high")


# ------------------------------------------------------------- array checks
def _array_specs(metadata: dict) -> tuple[dict, dict]:
    """``(required, optional)``: for each array key, its dtype (or the kinds of
    dtype allowed) and its shape (None: any length), as the metadata implies."""
    k, d, n = metadata["n_clusters"], metadata["n_dims"], metadata["n_cells"]
    f64, i32 = np.dtype(np.float64), np.dtype(np.int32)
    required: dict[str, tuple[Any, tuple]] = {
        "Nr": (f64, (k,)),
        "C": (f64, (k, d)),
        "Y": (f64, (d, k)),
        "sigma": (f64, (k,)),
        "cluster_center": (f64, (k, d)),
        "cluster_cov": (f64, (k, d, d)),
    }
    if metadata["algorithm"] == "harmony2":
        required["intercept"] = (f64, (k, d))
    for i in range(len(metadata["label_columns"])):
        required[f"label_{i}_codes"] = (i32, (n,))
        required[f"label_{i}_categories"] = (_CATEGORY_KINDS, (None,))
    projection = metadata.get("projection")
    if projection is not None:
        g = projection["n_genes"]
        required.update(
            {
                "genes": ("U", (g,)),
                "loadings": (f64, (g, d)),
                "gene_mean": (f64, (g,)),
                "gene_std": (f64, (g,)),
                "gene_scaled_mean": (f64, (g,)),
                "pc_mean": (f64, (d,)),
            }
        )
    optional: dict[str, tuple[Any, tuple]] = {
        "cells": (np.dtype(np.float32), (n, d)),
        "batch_codes": (i32, (n, len(metadata["variables"]))),
        "cell_names": ("U", (n,)),
    }
    return required, optional


def _checked_headers(archive, metadata: dict, problem) -> dict:
    """The ``.npy`` header of every array the metadata implies, each checked against
    its expected dtype and shape; no array data is read. Arrays the metadata
    lists but this version does not know are left unread."""
    required, optional = _array_specs(metadata)
    listed = set(metadata["arrays"])
    specs = {**required, **{key: spec for key, spec in optional.items() if key in listed}}
    headers = {}
    for key, (dtype, shape) in specs.items():
        if key not in archive.keys:
            raise problem(
                f"lacks the array {key!r}" + (" its metadata lists" if key in listed else "")
            )
        header = archive.header(key)
        kind_ok = (
            header.dtype == dtype
            if isinstance(dtype, np.dtype)
            else header.dtype.kind in dtype and header.dtype.isnative
        )
        shape_ok = len(header.shape) == len(shape) and all(
            e is None or e == a for e, a in zip(shape, header.shape, strict=True)
        )
        if not (kind_ok and shape_ok):
            want = (
                dtype
                if isinstance(dtype, np.dtype)
                else ("text" if dtype == "U" else "numbers or text")
            )
            dims = ", ".join("n" if e is None else str(e) for e in shape)
            raise problem(
                f"has an array {key!r} of {header.dtype} {header.shape}; expected "
                f"{want} ({dims}{',' if len(shape) == 1 else ''}) from its metadata"
            )
        headers[key] = header
    return headers


def _check_memory(path: Path, nbytes: int) -> None:
    """Refuse, naming the file, arrays that would not fit in the memory available."""
    available = _memory.host_available()
    if available is not None and nbytes > available:
        raise MemoryError(
            f"reference file {str(path)!r} holds {nbytes / 2**30:.2f} GiB of "
            f"arrays, more than the {available / 2**30:.2f} GiB of memory "
            f"available"
        )


def _array(problem, key: str, message: str) -> Exception:
    return problem(f"has an invalid array {key!r}: {message}")


def _check_values(arrays: dict, metadata: dict, problem) -> None:
    """Values of the arrays once read: finite, in range, consistent with the metadata."""
    for key, array in arrays.items():
        if array.dtype.kind == "f":
            bad = array.size - int(np.count_nonzero(np.isfinite(array)))
            if bad:
                raise _array(problem, key, f"{bad:,} non-finite value(s) (NaN or inf)")
    n, sizes = metadata["n_cells"], arrays["Nr"]
    if (sizes <= 0).any() or abs(sizes.sum() - n) > 1e-3 * n:
        raise _array(
            problem,
            "Nr",
            f"cluster sizes from {sizes.min():.4g} to "
            f"{sizes.max():.4g} summing to {sizes.sum():.6g}; expected "
            f"sizes > 0 summing to n_cells = {n} (each cell's "
            f"assignments sum to 1)",
        )
    try:  # the bounds of the reference run's own check
        val.check_sigma(arrays["sigma"], metadata["n_clusters"], dtype=metadata["dtype"])
    except ValueError as err:
        raise _array(problem, "sigma", str(err)) from None
    _check_cluster_terms(arrays, metadata, problem)
    _check_covariances(arrays["cluster_cov"], problem)
    if "batch_codes" in arrays:
        codes = arrays["batch_codes"]
        for v, (name, levels) in enumerate(
            zip(metadata["variables"], metadata["levels"], strict=True)
        ):
            column = codes[:, v]
            if column.size and (column.min() < 0 or column.max() >= len(levels)):
                raise _array(
                    problem,
                    "batch_codes",
                    f"codes of variable {name!r} from {column.min()} to "
                    f"{column.max()}; expected 0 to {len(levels) - 1} (its levels)",
                )
    for i, column in enumerate(metadata["label_columns"]):
        codes, categories = arrays[f"label_{i}_codes"], arrays[f"label_{i}_categories"]
        if codes.size and (codes.min() < -1 or codes.max() >= categories.size):
            raise _array(
                problem,
                f"label_{i}_codes",
                f"codes of label column {column['name']!r} from {codes.min()} to "
                f"{codes.max()}; expected -1 (missing) to {categories.size - 1}",
            )
        if not pd.Index(categories).is_unique:
            raise _array(
                problem,
                f"label_{i}_categories",
                f"categories of label column {column['name']!r} repeat",
            )
    if "genes" in arrays:
        if not pd.Index(arrays["genes"]).is_unique:
            raise _array(problem, "genes", "gene names repeat; queries are matched by gene name")
        if (arrays["gene_std"] <= 0).any():
            raise _array(problem, "gene_std", "values <= 0; expected per-gene scales > 0")


def _check_cluster_terms(arrays: dict, metadata: dict, problem) -> None:
    """Centroids ``Y`` of unit length, and cluster means (``C / Nr``, the centres)
    no longer than a cell of the reference run's dtype can be (the bound of
    :func:`run_harmony`'s input check)."""
    with np.errstate(over="ignore"):  # huge values give inf lengths, refused below
        norms = np.linalg.norm(arrays["Y"], axis=0)
        means = arrays["C"] / arrays["Nr"][:, None]
        lengths = {
            "C": np.linalg.norm(means, axis=1).max(),
            "cluster_center": np.linalg.norm(arrays["cluster_center"], axis=1).max(),
        }
    off = np.flatnonzero((np.abs(norms - 1) > 1e-6) & (norms != 0))
    if off.size:
        raise _array(
            problem,
            "Y",
            f"centroid {int(off[0])} has length {norms[off[0]]:.6g}; "
            f"expected unit-length columns (the rows of C scaled)",
        )
    d = metadata["n_dims"]
    longest = math.sqrt(float(np.finfo(metadata["dtype"]).max) / d)
    for key, length in lengths.items():
        if not length <= longest:
            raise _array(
                problem,
                key,
                f"a cluster mean of length {length:.3g}, beyond what a "
                f"{metadata['dtype']} cell can be ({longest:.1e})",
            )


def _check_covariances(cov: np.ndarray, problem) -> None:
    """Each cluster's covariance symmetric, positive semi-definite up to rounding,
    and not zero (mapping scores whiten by it)."""
    scale = np.abs(cov).max(axis=(1, 2))
    asymmetric = np.abs(cov - cov.transpose(0, 2, 1)).max(axis=(1, 2)) > 1e-9 * scale
    if asymmetric.any():
        raise _array(
            problem,
            "cluster_cov",
            f"cluster {int(np.flatnonzero(asymmetric)[0])}'s covariance is not symmetric",
        )
    try:
        eigenvalues = np.linalg.eigvalsh(cov)
    except np.linalg.LinAlgError as err:
        raise _array(problem, "cluster_cov", f"not covariances ({_reason(err)})") from None
    negative = eigenvalues[:, 0] < -1e-6 * np.maximum(eigenvalues[:, -1], 0)
    if negative.any():
        k = int(np.flatnonzero(negative)[0])
        raise _array(
            problem,
            "cluster_cov",
            f"cluster {k}'s covariance has a negative "
            f"eigenvalue ({eigenvalues[k, 0]:.3g}); expected "
            f"covariances (positive semi-definite)",
        )
    spread = np.trace(cov, axis1=1, axis2=2)
    flat = np.flatnonzero(spread <= 1e-12 * spread.max(initial=0))
    if flat.size:
        raise _array(
            problem,
            "cluster_cov",
            f"cluster {int(flat[0])}'s covariance has (almost) "
            f"no variance (trace {spread[flat[0]]:.3g}); "
            f"expected the spread of its cells",
        )


def _from_arrays(arrays: dict, metadata: dict) -> Reference:
    """The :class:`Reference` of arrays and metadata already checked."""
    labels = {}
    for i, column in enumerate(metadata["label_columns"]):
        labels[column["name"]] = pd.Categorical.from_codes(
            arrays[f"label_{i}_codes"],
            categories=pd.Index(arrays[f"label_{i}_categories"]),
            ordered=bool(column.get("ordered")),
        )
    projection = None
    info = metadata.get("projection")
    if info is not None:
        clip = info.get("clip")
        projection = GeneProjection(
            genes=arrays["genes"],
            loadings=arrays["loadings"],
            mean=arrays["gene_mean"],
            std=arrays["gene_std"],
            scaled_mean=arrays["gene_scaled_mean"],
            pc_mean=arrays["pc_mean"],
            clip=None if clip is None else (float(clip[0]), float(clip[1])),
            scaling=info["scaling"],
        )
    return Reference(
        algorithm=metadata["algorithm"],
        Nr=arrays["Nr"],
        C=arrays["C"],
        Y=arrays["Y"],
        sigma=arrays["sigma"],
        cluster_center=arrays["cluster_center"],
        cluster_cov=arrays["cluster_cov"],
        intercept=arrays.get("intercept"),
        parameters=metadata["parameters"],
        variables=list(metadata["variables"]),
        levels=[list(values) for values in metadata["levels"]],
        n_cells=int(metadata["n_cells"]),
        dtype=metadata["dtype"],
        cells=arrays.get("cells"),
        batch_codes=arrays.get("batch_codes"),
        labels=pd.DataFrame(labels) if labels else None,
        cell_names=arrays.get("cell_names"),
        projection=projection,
        basis=metadata.get("basis"),
        adjusted_basis=metadata.get("adjusted_basis"),
    )
