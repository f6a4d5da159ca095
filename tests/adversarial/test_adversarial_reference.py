"""Corrupt reference files and mismatched metadata: a clear error, or the right answer.

Reference files (``load_reference``): each case states the corruption (a change
to a good file's metadata or arrays, or a hand-made archive), the expected
error type and the words (regexes) the message must contain; every message
must also name the file, and a corrupt file raises ``ReferenceFileError`` (a
``ValueError``) whose ``path`` is the file. Nothing may be allocated beyond
what the metadata implies before the file is refused.

Metadata met by a Harmony run (``build_reference(ho, meta_data)``,
``plot_embedding``): paired by name; names that disagree are refused with
counts, a few names of each side and the remedy.
"""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import tracemalloc
import zipfile

import numpy as np
import pandas as pd
import pytest

import harmonypy as hm
from harmonypy.mapping.reference_file import ReferenceFileError

N_CELLS, N_DIMS, N_CLUSTERS = 120, 5, 4
NAMES = [f"c{i}" for i in range(N_CELLS)]


@pytest.fixture(scope="module")
def run():
    """A named embedding of two batches, its metadata, and its Harmony run."""
    rng = np.random.default_rng(0)
    pcs = pd.DataFrame(rng.normal(size=(N_CELLS, N_DIMS)), index=NAMES)
    pcs.iloc[:60] += 2
    meta = pd.DataFrame(
        {"batch": np.repeat(["a", "b"], 60), "t": rng.choice(["x", "y", "z"], N_CELLS)}, index=NAMES
    )
    ho = hm.run_harmony(pcs, meta, "batch", nclust=N_CLUSTERS, max_iter_harmony=2, verbose=False)
    return pcs, meta, ho


@pytest.fixture(scope="module")
def good(run, tmp_path_factory):
    """A valid reference file, and its metadata and arrays."""
    _, meta, ho = run
    path = hm.build_reference(ho, meta, labels="t").save(
        tmp_path_factory.mktemp("good") / "good.npz"
    )
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return path, json.loads(arrays.pop("__metadata__").tobytes()), arrays


def _metadata_bytes(metadata) -> np.ndarray:
    text = metadata if isinstance(metadata, (str, bytes)) else json.dumps(metadata)
    return np.frombuffer(text.encode() if isinstance(text, str) else text, dtype=np.uint8)


def _write(path, metadata, arrays):
    np.savez(path, __metadata__=_metadata_bytes(metadata), **arrays)


def _with_projection(metadata, arrays):
    """A (consistent) gene projection of 3 genes added to the file."""
    metadata["projection"] = {"scaling": "scaled", "n_genes": 3, "clip": None}
    arrays.update(
        genes=np.array(["g1", "g2", "g3"]),
        loadings=np.ones((3, N_DIMS)),
        gene_mean=np.zeros(3),
        gene_std=np.ones(3),
        gene_scaled_mean=np.zeros(3),
        pc_mean=np.zeros(N_DIMS),
    )
    metadata["arrays"] = sorted(set(metadata["arrays"]) | set(arrays) | {"__metadata__"})


def _set(**fields):
    return lambda m, a: m.update(fields)


def _param(**fields):
    return lambda m, a: m["parameters"].update(fields)


def _array(key, change):
    return lambda m, a: a.update({key: change(a[key].copy())})


def _put(array, index, value):
    array[index] = value
    return array


def _drop(key):
    def change(m, a):
        del m[key]

    return change


def _negated_cov(cov):
    return -cov


def _asymmetric(cov):
    cov[0, 0, 1] += 1.0
    return cov


# ------------------------------------------------------------------ metadata
# name: (change(metadata, arrays), error type, facts the message must contain)
METADATA_CASES = {
    "n_cells text": (
        _set(n_cells="abc"),
        ReferenceFileError,
        [r"metadata field 'n_cells'", r"'abc'", r"an integer >= 1"],
    ),
    "n_cells zero": (_set(n_cells=0), ReferenceFileError, [r"'n_cells': 0", r"integer >= 1"]),
    "n_cells boolean": (_set(n_cells=True), ReferenceFileError, [r"'n_cells': True"]),
    "n_cells fraction": (_set(n_cells=119.5), ReferenceFileError, [r"'n_cells': 119\.5"]),
    "n_dims null": (_set(n_dims=None), ReferenceFileError, [r"'n_dims': None"]),
    "more clusters than cells": (
        _set(n_clusters=N_CELLS + 1),
        ReferenceFileError,
        [r"'n_clusters': 121", r"at most n_cells = 120"],
    ),
    "dtype unknown": (
        _set(dtype="float16"),
        ReferenceFileError,
        [r"'dtype': 'float16'", r"'float32' or 'float64'"],
    ),
    "algorithm a list": (
        _set(algorithm=["harmony1"]),
        ReferenceFileError,
        [r"unknown algorithm \['harmony1'\]", r"'harmony2'"],
    ),
    "variables text": (
        _set(variables="batch"),
        ReferenceFileError,
        [r"'variables': 'batch'", r"list of distinct variable names"],
    ),
    "variables repeated": (
        _set(variables=["batch", "batch"]),
        ReferenceFileError,
        [r"'variables'", r"distinct"],
    ),
    "no variables in a Harmony reference": (
        _set(variables=[], levels=[]),
        ReferenceFileError,
        [r"'variables': \[\]", r"at least one variable for a Harmony reference"],
    ),
    "levels text": (
        _set(levels="abc"),
        ReferenceFileError,
        [r"'levels': 'abc'", r"a list of 1 list\(s\) of levels, one per variable"],
    ),
    "levels empty": (
        _set(levels=[[]]),
        ReferenceFileError,
        [r"'levels\[0\]': \[\]", r"variable 'batch'", r"non-empty"],
    ),
    "levels nested": (
        _set(levels=[[["a"], "b"]]),
        ReferenceFileError,
        [r"'levels\[0\]'", r"texts, numbers or booleans"],
    ),
    "levels repeated": (
        _set(levels=[["a", "a"]]),
        ReferenceFileError,
        [r"'levels\[0\]'", r"distinct"],
    ),
    "label_columns text": (
        _set(label_columns="t"),
        ReferenceFileError,
        [r"'label_columns': 't'", r'"name": text'],
    ),
    "label name a number": (
        _set(label_columns=[{"name": 3, "ordered": False}]),
        ReferenceFileError,
        [r"'label_columns'"],
    ),
    "label ordered text": (
        _set(label_columns=[{"name": "t", "ordered": "yes"}]),
        ReferenceFileError,
        [r"'label_columns'", r"true or false"],
    ),
    "parameters a list": (
        _set(parameters=[]),
        ReferenceFileError,
        [r"'parameters': \[\]", r"a JSON object"],
    ),
    "alpha text": (
        _param(alpha="0.2"),
        ReferenceFileError,
        [r"'parameters\.alpha': '0\.2'", r"a number > 0"],
    ),
    "alpha negative": (_param(alpha=-1), ReferenceFileError, [r"'parameters\.alpha': -1"]),
    "lamb_estimated text": (
        _param(lamb_estimated="no"),
        ReferenceFileError,
        [r"'parameters\.lamb_estimated': 'no'", r"true or false"],
    ),
    "theta of another length": (
        _param(theta=[2.0]),
        ReferenceFileError,
        [r"'parameters\.theta'", r"2 numbers \(one per batch level\)"],
    ),
    "nclust disagrees": (
        _param(nclust=7),
        ReferenceFileError,
        [r"'parameters\.nclust': 7", r"n_clusters = 4"],
    ),
    "arrays text": (
        _set(arrays="Nr"),
        ReferenceFileError,
        [r"'arrays': 'Nr'", r"list of distinct array names"],
    ),
    "basis a number": (_set(basis=5), ReferenceFileError, [r"'basis': 5", r"text"]),
    "version a number": (
        _set(harmonypy_version=2),
        ReferenceFileError,
        [r"'harmonypy_version': 2"],
    ),
    "format_version text": (
        _set(format_version="1"),
        ReferenceFileError,
        [r"format_version '1'", r"integer >= 1"],
    ),
    "levels missing": (_drop("levels"), ReferenceFileError, [r"incomplete metadata", r"'levels'"]),
    "projection scaling unknown": (
        lambda m, a: (_with_projection(m, a), m["projection"].update(scaling="zscore")),
        ReferenceFileError,
        [r"'projection'", r"'zscore'", r"'scaled'"],
    ),
    "projection clip reversed": (
        lambda m, a: (_with_projection(m, a), m["projection"].update(clip=[3, -3])),
        ReferenceFileError,
        [r"'projection\.clip': \[3, -3\]", r"low <= high"],
    ),
    "projection n_genes text": (
        lambda m, a: (_with_projection(m, a), m["projection"].update(n_genes="3")),
        ReferenceFileError,
        [r"'projection\.n_genes': '3'"],
    ),
}

# -------------------------------------------------------------- array values
ARRAY_CASES = {
    "NaN in cells": (
        _array("cells", lambda x: _put(x, (3, 1), np.nan)),
        ReferenceFileError,
        [r"invalid array 'cells'", r"1 non-finite value\(s\)"],
    ),
    "inf in cells": (
        _array("cells", lambda x: _put(x, 0, np.inf)),
        ReferenceFileError,
        [r"'cells'", r"5 non-finite"],
    ),
    "NaN in C": (
        _array("C", lambda x: _put(x, 0, np.nan)),
        ReferenceFileError,
        [r"'C'", r"non-finite"],
    ),
    "inf in cluster_center": (
        _array("cluster_center", lambda x: _put(x, 1, -np.inf)),
        ReferenceFileError,
        [r"'cluster_center'", r"non-finite"],
    ),
    "Nr all zeros": (
        _array("Nr", np.zeros_like),
        ReferenceFileError,
        [r"invalid array 'Nr'", r"summing to 0", r"n_cells = 120"],
    ),
    "Nr negative": (_array("Nr", lambda x: -x), ReferenceFileError, [r"'Nr'", r"sizes > 0"]),
    "Nr a zero-count cluster": (
        _array("Nr", lambda x: np.array([x.sum(), 0.0, 0.0, 0.0])),
        ReferenceFileError,
        [r"'Nr'", r"from 0 to 120"],
    ),
    "sigma zero": (
        _array("sigma", np.zeros_like),
        ReferenceFileError,
        [r"invalid array 'sigma'", r"> 0"],
    ),
    "sigma beyond float32": (
        _array("sigma", lambda x: x * 1e300),
        ReferenceFileError,
        [r"'sigma'", r"between 1e-38 and"],
    ),
    "batch_codes out of range": (
        _array("batch_codes", lambda x: x + 5),
        ReferenceFileError,
        [r"invalid array 'batch_codes'", r"variable 'batch'", r"expected 0 to 1"],
    ),
    "batch_codes negative": (
        _array("batch_codes", lambda x: _put(x, 7, -1)),
        ReferenceFileError,
        [r"'batch_codes'", r"from -1"],
    ),
    "label codes out of range": (
        _array("label_0_codes", lambda x: _put(x, 0, 9)),
        ReferenceFileError,
        [r"'label_0_codes'", r"label column 't'", r"to 2"],
    ),
    "label categories repeated": (
        _array("label_0_categories", lambda x: np.array(["x"] * 3)),
        ReferenceFileError,
        [r"'label_0_categories'", r"label column 't'", r"repeat"],
    ),
    "label categories NaN": (
        _array("label_0_categories", lambda x: np.array([0.5, np.nan, 2])),
        ReferenceFileError,
        [r"'label_0_categories'", r"non-finite"],
    ),
    "cluster_cov negated": (
        _array("cluster_cov", _negated_cov),
        ReferenceFileError,
        [r"invalid array 'cluster_cov'", r"negative eigenvalue"],
    ),
    "cluster_cov asymmetric": (
        _array("cluster_cov", _asymmetric),
        ReferenceFileError,
        [r"'cluster_cov'", r"cluster 0's covariance is not symmetric"],
    ),
    "cluster_cov zero": (
        _array("cluster_cov", np.zeros_like),
        ReferenceFileError,
        [r"'cluster_cov'", r"no variance"],
    ),
    "Y scaled": (
        _array("Y", lambda x: x * 3),
        ReferenceFileError,
        [r"invalid array 'Y'", r"unit-length"],
    ),
    "C beyond float32": (
        _array("C", lambda x: x * 1e300),
        ReferenceFileError,
        [r"invalid array 'C'", r"beyond what a float32 cell can be"],
    ),
    "genes repeated": (
        lambda m, a: (_with_projection(m, a), a.update(genes=np.array(["g1", "g1", "g3"]))),
        ReferenceFileError,
        [r"'genes'", r"gene names repeat"],
    ),
    "gene_std zero": (
        lambda m, a: (_with_projection(m, a), a.update(gene_std=np.zeros(3))),
        ReferenceFileError,
        [r"'gene_std'", r"<= 0"],
    ),
}

# ------------------------------------------------ declared dtypes and shapes
HEADER_CASES = {
    "C float32": (
        _array("C", lambda x: x.astype(np.float32)),
        ReferenceFileError,
        [r"array 'C' of float32 \(4, 5\)", r"expected float64 \(4, 5\)"],
    ),
    "C big-endian": (
        _array("C", lambda x: x.astype(">f8")),
        ReferenceFileError,
        [r"array 'C' of >f8"],
    ),
    "cells of other cells": (
        _array("cells", lambda x: x[:-1]),
        ReferenceFileError,
        [r"array 'cells' of float32 \(119, 5\)", r"expected float32 \(120, 5\)"],
    ),
    "cell_names numbers": (
        _array("cell_names", lambda x: np.arange(N_CELLS)),
        ReferenceFileError,
        [r"'cell_names' of int64", r"expected text"],
    ),
    "batch_codes int64": (
        _array("batch_codes", lambda x: x.astype(np.int64)),
        ReferenceFileError,
        [r"'batch_codes' of int64 \(120, 1\)"],
    ),
    "categories of Python objects": (
        _array("label_0_categories", lambda x: np.array(["x", 1, None], dtype=object)),
        ReferenceFileError,
        [r"'label_0_categories'", r"Python objects", r"no pickle"],
    ),
    "Y missing": (
        lambda m, a: a.pop("Y"),
        ReferenceFileError,
        [r"lacks the array 'Y' its metadata lists"],
    ),
    "label arrays missing": (
        lambda m, a: a.pop("label_0_codes"),
        ReferenceFileError,
        [r"lacks the array 'label_0_codes'"],
    ),
    "genes missing": (
        lambda m, a: (_with_projection(m, a), a.pop("genes")),
        ReferenceFileError,
        [r"lacks the array 'genes'"],
    ),
}


def _check(path, error, facts):
    with pytest.raises(error) as info:
        hm.load_reference(path)
    message = str(info.value)
    assert re.search(re.escape(f"reference file {str(path)!r}"), message), message
    for fact in facts:
        assert re.search(fact, message), f"{fact!r} not in message: {message}"
    if error is ReferenceFileError:
        assert info.value.path == path
    return message


@pytest.mark.parametrize("case", sorted({**METADATA_CASES, **ARRAY_CASES, **HEADER_CASES}))
def test_corrupt_reference_file(good, tmp_path, case):
    _, metadata, arrays = good
    change, error, facts = {**METADATA_CASES, **ARRAY_CASES, **HEADER_CASES}[case]
    metadata, arrays = json.loads(json.dumps(metadata)), dict(arrays)
    change(metadata, arrays)
    path = tmp_path / "bad.npz"
    _write(path, metadata, arrays)
    _check(path, error, facts)


# ------------------------------------------------------- unreadable metadata
RAW_METADATA_CASES = {
    "NaN": ('{"n_cells": NaN}', [r"unreadable metadata", r"constant NaN"]),
    "number out of range": ('{"n_cells": 1e999}', [r"unreadable metadata", r"out of range"]),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, [r"unreadable metadata", r"Recursion"]),
    "not UTF-8": (b"\xff\xfe{", [r"unreadable metadata", r"UnicodeDecodeError"]),
    "a list": ("[1, 2]", [r"not a harmonypy reference \(format 'list'"]),
}


@pytest.mark.parametrize("case", sorted(RAW_METADATA_CASES))
def test_unreadable_metadata(good, tmp_path, case):
    text, facts = RAW_METADATA_CASES[case]
    path = tmp_path / "bad.npz"
    _write(path, text, good[2])
    _check(path, ReferenceFileError, facts)


# --------------------------------------------------------- sizes and archives
def _npy(array: np.ndarray, shape=None) -> bytes:
    """An .npy file's bytes; ``shape`` replaces the shape its header declares."""
    header = np.lib.format.header_data_from_array_1_0(array)
    if shape is not None:
        header["shape"] = shape
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + array.tobytes()


def _archive(path, members: dict, compression=zipfile.ZIP_STORED):
    """An .npz of raw member bytes (``name.npy`` -> bytes)."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _members(good, **replace) -> dict:
    _, metadata, arrays = good
    members = {f"{key}.npy": _npy(value) for key, value in arrays.items()}
    members["__metadata__.npy"] = _npy(_metadata_bytes(metadata))
    members.update({f"{key}.npy": data for key, data in replace.items()})
    return members


def _patch_directory(path, name: str, file_size: int):
    """Make the ZIP central directory declare ``file_size`` uncompressed bytes for ``name``."""
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x01\x02")
    while True:
        name_length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46 : start + 46 + name_length] == name.encode():
            struct.pack_into("<I", data, start + 24, file_size)
            break
        start = data.index(b"PK\x01\x02", start + 4)
    path.write_bytes(bytes(data))


def test_huge_declared_shape_is_refused_without_allocating(good, tmp_path):
    """A header declaring 7 TiB: refused by its shape, naming the file and the array."""
    cells = good[2]["cells"]
    path = tmp_path / "huge.npz"
    _archive(path, _members(good, cells=_npy(cells, shape=(10**12, 2))))
    _check(path, ReferenceFileError, [r"array 'cells'", r"\(1000000000000, 2\)"])


def test_compressed_zeros_are_refused_before_inflating(good, tmp_path):
    """100 kB of deflated zeros declaring 50 MB of cells: refused from the header,
    with at most a few MB allocated."""
    zeros = np.zeros((2_500_000, N_DIMS), dtype=np.float32)
    path = tmp_path / "bomb.npz"
    _archive(path, _members(good, cells=_npy(zeros)), compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2**20 and zeros.nbytes == 50_000_000
    del zeros
    tracemalloc.start()
    try:
        _check(
            path,
            ReferenceFileError,
            [r"array 'cells' of float32 \(2500000, 5\)", r"expected float32 \(120, 5\)"],
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak


def test_member_declaring_more_than_deflate_can_produce(good, tmp_path):
    path = tmp_path / "directory.npz"
    _archive(path, _members(good), compression=zipfile.ZIP_DEFLATED)
    _patch_directory(path, "cells.npy", 2**31)
    _check(
        path, ReferenceFileError, [r"member 'cells' that declares 2,147,483,648 bytes", r"corrupt"]
    )


def test_stored_member_declaring_more_than_it_holds(good, tmp_path):
    path = tmp_path / "stored.npz"
    _archive(path, _members(good))
    _patch_directory(path, "cells.npy", 10**9)
    _check(path, ReferenceFileError, [r"member 'cells' that declares 1,000,000,000 bytes"])


def test_member_inflating_beyond_its_declared_size(good, tmp_path):
    """The deflate stream holds more than the directory declares: never inflated
    past the declared size, and refused (its CRC is that of all the data)."""
    cells = good[2]["cells"]
    path = tmp_path / "longer.npz"
    _archive(
        path, _members(good, cells=_npy(cells) + bytes(2**20)), compression=zipfile.ZIP_DEFLATED
    )
    _patch_directory(path, "cells.npy", len(_npy(cells)))
    _check(path, ReferenceFileError, [r"array 'cells' cannot be read", r"CRC"])


@pytest.mark.parametrize("extra", [16, -16])
def test_member_size_disagreeing_with_its_header(good, tmp_path, extra):
    cells = _npy(good[2]["cells"])
    path = tmp_path / "sized.npz"
    _archive(path, _members(good, cells=cells + bytes(extra) if extra > 0 else cells[:extra]))
    _check(
        path,
        ReferenceFileError,
        [r"array 'cells' whose header declares float32 \(120, 5\)", r"in a member of"],
    )


def test_other_compression_and_duplicates_are_refused(good, tmp_path):
    path = tmp_path / "bzip2.npz"
    _archive(path, _members(good), compression=zipfile.ZIP_BZIP2)
    _check(path, ReferenceFileError, [r"ZIP method 12", r"stored or deflated"])
    path = tmp_path / "twice.npz"  # 'C.npy' and 'C' are both the array 'C'
    _archive(path, {**_members(good), "C": _npy(good[2]["C"])})
    _check(path, ReferenceFileError, [r"holds the array 'C' twice"])


def test_huge_metadata_entry_is_refused(good, tmp_path):
    """64 MB of (deflated) metadata: more than a reference's, refused before reading."""
    path = tmp_path / "metadata.npz"
    big = _npy(np.zeros(2**26 + 1, dtype=np.uint8))
    _archive(path, _members(good, __metadata__=big), compression=zipfile.ZIP_DEFLATED)
    _check(path, ReferenceFileError, [r"has 67,108,865 bytes of metadata", r"corrupt"])
    path = tmp_path / "declared.npz"  # the same size declared, 10 bytes held
    _archive(path, _members(good, __metadata__=_npy(np.zeros(10, np.uint8), shape=(2**26 + 1,))))
    _check(
        path,
        ReferenceFileError,
        [
            r"array '__metadata__' whose header declares uint8 "
            r"\(67108865,\)",
            r"in a member of 10 bytes",
        ],
    )


def test_consistent_file_larger_than_memory(good, monkeypatch):
    monkeypatch.setattr("harmonypy.engine.memory.host_available", lambda: 1000)
    with pytest.raises(MemoryError, match=re.escape(repr(str(good[0]))) + r".*memory"):
        hm.load_reference(good[0])


def test_fortran_ordered_arrays_load(good, tmp_path):
    """np.save writes a transposed array in Fortran order: read as the same array."""
    _, metadata, arrays = good
    path = tmp_path / "fortran.npz"
    _write(path, metadata, {**arrays, "C": np.asfortranarray(arrays["C"])})
    np.testing.assert_array_equal(hm.load_reference(path).C, arrays["C"])


def test_folders(good, tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(repr(str(tmp_path))) + ".*a folder"):
        hm.load_reference(tmp_path)
    ref = hm.load_reference(good[0])
    with pytest.raises(IsADirectoryError, match=r"it is a folder; give a file's path"):
        ref.save(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"its folder .*missing' does not exist"):
        ref.save(tmp_path / "missing" / "ref.npz")
    assert list(tmp_path.iterdir()) == []


# ================================================ metadata met by a Harmony run
def _other_cells(meta):
    return meta.set_axis([f"x{i}" for i in range(len(meta))])


def _repeated(meta):
    return meta.set_axis(NAMES[:-1] + NAMES[:1])


def _row_numbers(meta):
    """The index of a sorted frame: integers, not the run's names."""
    return (
        meta.sort_values("t")
        .reset_index(drop=True)
        .set_axis(np.random.default_rng(1).permutation(N_CELLS))
    )


# name: (meta_data from the run's metadata, error type, facts)
PAIRING_CASES = {
    "other cells, same length": (
        _other_cells,
        ValueError,
        [
            r"the Harmony run's cell names \(ho\.cell_names\) and meta_data's index name "
            r"different cells",
            r"0 of the embedding's 120 cells \(0%\)",
            r"'c0', 'c1'",
            r"'x0', 'x1'",
            r"meta\.loc\[ho\.cell_names\]",
            r"reset_index\(drop=True\)",
        ],
    ),
    "a subset": (
        lambda m: m.iloc[:-10],
        ValueError,
        [
            r"110 of the embedding's 120 cells \(92%\)",
            r"10 embedding cell\(s\) are not in the metadata \('c110'",
        ],
    ),
    "a superset": (
        lambda m: pd.concat([m, _other_cells(m.iloc[:3])]),
        ValueError,
        [r"3 metadata name\(s\) are not in the embedding \('x0', 'x1', 'x2'\)"],
    ),
    "repeated names": (
        _repeated,
        ValueError,
        [
            r"meta_data's index names cells, but 1 name\(s\) occur more than once",
            r"'c0' \(2 times\)",
        ],
    ),
    "integer labels against text names": (
        _row_numbers,
        ValueError,
        [r"meta_data's index name different cells", r"0 of"],
    ),
    "a Series": (lambda m: m["t"], TypeError, [r"meta_data must be a pandas DataFrame"]),
}


@pytest.mark.parametrize("case", sorted(PAIRING_CASES))
def test_build_reference_refuses_other_cells(run, case):
    _, meta, ho = run
    make, error, facts = PAIRING_CASES[case]
    with pytest.raises(error) as info:
        hm.build_reference(ho, make(meta), labels="t")
    for fact in facts:
        assert re.search(fact, str(info.value)), f"{fact!r} not in message: {info.value}"


def test_harmony_remembers_the_cell_names(run):
    pcs, meta, ho = run
    assert list(ho.cell_names) == NAMES
    fast = dict(nclust=N_CLUSTERS, max_iter_harmony=1, verbose=False)
    # From meta_data's index when data_mat has none; from a cell_id column next.
    assert list(hm.run_harmony(pcs.to_numpy(), meta, "batch", **fast).cell_names) == NAMES
    column = meta.reset_index(names="cell_id")
    assert list(hm.run_harmony(pcs.to_numpy(), column, "batch", **fast).cell_names) == NAMES
    assert (
        hm.run_harmony(pcs.to_numpy(), meta.reset_index(drop=True), "batch", **fast).cell_names
        is None
    )
    # Repeated names tell no cells apart: the run pairs by position, and so
    # does build_reference with the same metadata (not refused for repeats).
    repeated = _repeated(meta)
    ho = hm.run_harmony(pcs.to_numpy(), repeated, "batch", **fast)
    assert ho.cell_names is None
    ref = hm.build_reference(ho, repeated, labels="t")
    assert list(ref.labels["t"].astype(str)) == list(meta["t"])


@pytest.mark.parametrize("reorder", ["shuffled index", "cell_id column, integer index"])
def test_build_reference_pairs_reordered_metadata_by_name(run, reorder):
    _, meta, ho = run
    shuffled = meta.sample(frac=1.0, random_state=3)
    if reorder != "shuffled index":  # a sorted frame's integer index, names in a column
        shuffled = shuffled.reset_index(names="cell_id").set_axis(
            np.random.default_rng(2).permutation(N_CELLS)
        )
    ref = hm.build_reference(ho, shuffled, labels="t")
    assert list(ref.cell_names) == NAMES
    assert list(ref.labels["t"].astype(str)) == list(meta["t"])


def test_position_pairing_is_logged(run, caplog):
    pcs, meta, ho = run
    plain = meta.reset_index(drop=True)
    with caplog.at_level(logging.INFO, logger="harmonypy"):
        ref = hm.build_reference(ho, plain, labels="t")
    assert (
        "paired with the Harmony run's cells by position (meta_data named no cells)" in caplog.text
    )
    assert list(ref.cell_names) == NAMES  # the run's names
    caplog.clear()
    unnamed = hm.run_harmony(
        pcs.to_numpy(), plain, "batch", nclust=N_CLUSTERS, max_iter_harmony=1, verbose=False
    )
    with caplog.at_level(logging.INFO, logger="harmonypy"):
        ref = hm.build_reference(unnamed, meta, labels="t")
    assert "by position (the Harmony run's inputs named no cells)" in caplog.text
    assert list(ref.cell_names) == NAMES  # the metadata's


def test_plot_embedding_pairs_by_name(run):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from harmonypy import plotting

    pcs, meta, ho = run

    def colours(before, meta_data):
        fig = plotting.plot_embedding(before, ho, meta_data, "t")
        return [np.asarray(ax.collections[0].get_facecolors()) for ax in fig.axes[:2]]

    expected = colours(pcs, meta)
    shuffled = meta.sample(frac=1.0, random_state=4)
    for got, want in zip(
        colours(pcs.sample(frac=1.0, random_state=5), shuffled), expected, strict=True
    ):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(
        ValueError,
        match=r"ho\.cell_names\) and meta's index name different "
        r"cells: 0 of",
    ):
        plotting.plot_embedding(pcs, ho, _other_cells(meta), "t")
    with pytest.raises(ValueError, match=r"before's index name different cells"):
        plotting.plot_embedding(_other_cells(pcs), ho, meta, "t")
