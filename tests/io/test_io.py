"""File input and output of the command line (harmonypy.io), in process."""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import signal
import stat

import numpy as np
import pandas as pd
import pytest

from harmonypy.io import outputs, readers
from harmonypy.io.formats import file_format
from harmonypy.io.names import match_cells
from harmonypy.io.outputs import OutputFiles, OutputSpec, check_outputs
from harmonypy.io.readers import read_embedding, read_h5ad, read_meta
from harmonypy.io.tables import Table
from harmonypy.io.writers import save_figure, write_table

HAS_ANNDATA = importlib.util.find_spec("anndata") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
TABLES = ("tsv", "csv", "parquet", "npy")


def pcs_frame(n: int = 60, d: int = 3, seed: int = 0) -> pd.DataFrame:
    values = np.random.default_rng(seed).standard_normal((n, d))
    return pd.DataFrame(values, columns=[f"PC{i + 1}" for i in range(d)])


@pytest.fixture
def sigint_is_keyboard_interrupt():
    """SIGINT raises KeyboardInterrupt, as in a terminal: a shell starts a
    background job (``pytest &``) with SIGINT ignored, and Python then keeps it
    ignored, which would make the Ctrl-C tests below meaningless."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def leftovers(folder) -> list[str]:
    """Temporary files left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# --------------------------------------------------------------- formats
def test_file_format():
    assert file_format("a.tsv") == file_format("a.TXT") == file_format("a.tsv.gz") == "tsv"
    assert file_format("dir.v2/a.b.csv.xz") == "csv"
    assert file_format("a.parquet") == "parquet" and file_format("x.npy") == "npy"
    assert file_format("x.h5ad") == "h5ad"
    for name in ("a.xlsx", "a", "a.gz"):
        with pytest.raises(ValueError, match="cannot tell the format"):
            file_format(name)


# --------------------------------------------------------------- reading
def corrupt_inputs(folder) -> dict[str, bytes]:
    text = pcs_frame(2000).to_csv(sep="\t", index=False).encode()
    packed = gzip.compress(text)
    flipped = bytearray(packed)
    flipped[len(packed) // 2] ^= 0xFF
    return {
        "truncated.tsv.gz": packed[: len(packed) // 2],  # EOFError
        "not_gzip.tsv.gz": text,  # gzip.BadGzipFile
        "flipped.tsv.gz": bytes(flipped),  # zlib.error / bad CRC
        "latin1.tsv": "cell\tPC1\n\xe9t\xe9\t1.0\n".encode("latin-1"),
        "empty.tsv": b"",
        "ragged.csv": b"PC1,PC2\n1,2\n1,2,3,4\n",
        "bad.npy": b"\x93NUMPY not really",
        "bad.parquet": b"not a parquet file" * 10,
    }


def test_unreadable_inputs_name_the_file(tmp_path):
    for name, content in corrupt_inputs(tmp_path).items():
        if name.endswith(".parquet") and not HAS_PYARROW:
            continue
        path = tmp_path / name
        path.write_bytes(content)
        for read in (read_embedding, read_meta):
            if name.endswith(".npy") and read is read_meta:
                continue
            with pytest.raises(ValueError, match="cannot read") as info:
                read(path)
            assert str(path) in str(info.value), name
            assert isinstance(info.value, ValueError)
    message = str(pytest.raises(ValueError, read_meta, tmp_path / "truncated.tsv.gz").value)
    assert "ends early" in message and "EOFError" in message


@pytest.mark.skipif(not HAS_ANNDATA, reason="anndata not installed")
def test_unreadable_h5ad_names_the_file(tmp_path):
    path = tmp_path / "bad.h5ad"
    path.write_bytes(b"not hdf5" * 20)
    with pytest.raises(ValueError, match=f"cannot read {path}"):
        read_h5ad(path)


def test_missing_and_folder_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="embedding file not found"):
        read_embedding(tmp_path / "nope.tsv")
    (tmp_path / "dir.tsv").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_meta(tmp_path / "dir.tsv")


# ----------------------------------------------------- embedding names
def write_with_first(tmp_path, name, values, n=60) -> Table:
    frame = pcs_frame(n)
    frame.insert(0, name, values)
    frame.to_csv(tmp_path / "pcs.tsv", sep="\t", index=False)
    return read_embedding(tmp_path / "pcs.tsv")


@pytest.mark.parametrize("header", ["cell_id", "Barcode", "ID", "index", "obs_names", "cellID"])
def test_integer_identifier_column_is_names_not_a_pc(tmp_path, header):
    ids = np.random.default_rng(1).choice(10**6, 60, replace=False)
    table = write_with_first(tmp_path, header, ids)
    assert list(table.frame.columns) == ["PC1", "PC2", "PC3"]
    assert table.has_names and list(table.names) == list(ids)
    assert table.names_from == f"column {header!r}"


@pytest.mark.parametrize("start", [0, 1])
def test_row_number_column_is_names_not_a_pc(tmp_path, start):
    numbers = np.random.default_rng(2).permutation(60) + start
    table = write_with_first(tmp_path, "n", numbers)
    assert list(table.frame.columns) == ["PC1", "PC2", "PC3"] and table.has_names


def test_numeric_columns_stay_pcs(tmp_path):
    table = write_with_first(tmp_path, "depth", np.arange(60) * 7)  # integers, not 0..N-1
    assert list(table.frame.columns)[0] == "depth" and not table.has_names
    frame = pcs_frame()
    frame.to_csv(tmp_path / "plain.csv", index=False)
    plain = read_embedding(tmp_path / "plain.csv")
    assert not plain.has_names and plain.frame.shape == (60, 3)


def test_text_column_r_and_pandas_row_names(tmp_path):
    frame = pcs_frame()
    names = [f"c{i}" for i in range(60)]
    table = write_with_first(tmp_path, "cell", names)
    assert list(table.names) == names and table.frame.index.name == "cell"
    # R's write.table: a header one field shorter than the rows.
    lines = ["\t".join(frame.columns)] + [
        "\t".join([n, *map(str, row)]) for n, row in zip(names, frame.to_numpy(), strict=True)
    ]
    (tmp_path / "r.tsv").write_text("\n".join(lines) + "\n")
    r_table = read_embedding(tmp_path / "r.tsv")
    assert list(r_table.names) == names and r_table.names_from == "row names"
    # pandas' to_csv(index=True) with a default index, then a name column.
    with_cell = frame.assign(cell=names)[["cell", *frame.columns]]
    with_cell.to_csv(tmp_path / "pd.csv")
    pd_table = read_embedding(tmp_path / "pd.csv")
    assert list(pd_table.names) == names and list(pd_table.frame.columns) == list(frame.columns)


def test_names_option(tmp_path):
    frame = pcs_frame()
    frame["barcode_text"] = [f"b{i}" for i in range(60)]
    frame.to_csv(tmp_path / "pcs.csv", index=False)
    table = read_embedding(tmp_path / "pcs.csv", names="barcode_text")
    assert table.names[0] == "b0" and list(table.frame.columns) == ["PC1", "PC2", "PC3"]
    with pytest.raises(KeyError, match="did you mean 'barcode_text'"):
        read_embedding(tmp_path / "pcs.csv", names="barcode_txt")
    np.save(tmp_path / "pcs.npy", frame[["PC1"]].to_numpy())
    with pytest.raises(ValueError, match="NumPy array without columns"):
        read_embedding(tmp_path / "pcs.npy", names="cell")


def test_bad_embedding_columns(tmp_path):
    frame = pcs_frame()
    frame["donor"] = "a"
    frame.to_csv(tmp_path / "pcs.csv", index=False)
    with pytest.raises(ValueError, match="'donor' are not numeric"):
        read_embedding(tmp_path / "pcs.csv")
    pd.DataFrame({"cell": ["a", "b"]}).to_csv(tmp_path / "only.csv", index=False)
    with pytest.raises(ValueError, match="no PC columns"):
        read_embedding(tmp_path / "only.csv")


# ------------------------------------------------------------ matching
def named(names) -> Table:
    frame = pd.DataFrame({"PC1": np.arange(len(names), dtype=float)}, index=pd.Index(names))
    return Table(frame, True, "column 'cell'")


def meta_table(**columns) -> Table:
    return Table(pd.DataFrame(columns), False)


def match(embedding: Table, meta: Table, **kwargs):
    return match_cells(embedding, meta, embedding_path="pcs.tsv", meta_path="meta.tsv", **kwargs)


CELLS = [f"cell{i:03d}" for i in range(100)]


def test_same_cells_same_order_and_reordered(caplog):
    donor = [f"d{i % 3}" for i in range(100)]
    result = match(named(CELLS), meta_table(cell=CELLS, donor=donor))
    assert result.by_name and not result.reordered and result.names_from == "column 'cell'"
    shuffled = np.random.default_rng(0).permutation(100)
    meta = meta_table(barcode=np.array(CELLS)[shuffled], donor=np.array(donor)[shuffled])
    with caplog.at_level(logging.INFO, logger="harmonypy.io.names"):
        result = match(named(CELLS), meta)
    assert result.reordered and list(result.meta["barcode"]) == CELLS
    assert list(result.meta["donor"]) == donor and isinstance(result.meta.index, pd.RangeIndex)
    assert "reordered" in result.describe() and "reordered" in caplog.text


def test_repeated_names_are_an_error():
    repeated = CELLS[:98] + ["cell000", "cell001"]
    with pytest.raises(ValueError) as info:
        match(named(repeated), meta_table(cell=CELLS))
    message = str(info.value)
    assert "the embedding pcs.tsv" in message and "2 name(s) occur more than once" in message
    assert "'cell000' (2 times)" in message and "--no-names" in message
    with pytest.raises(
        ValueError,
        match=r"metadata meta.tsv \(column 'cell'\) names cells, "
        r"but 2 name",
    ):
        match(named(CELLS), meta_table(cell=repeated))


def test_partial_overlap_is_an_error():
    # 37 of 100 names shared (the case), the rest different.
    meta_names = CELLS[:37] + [f"other{i:03d}" for i in range(63)]
    with pytest.raises(ValueError) as info:
        match(named(CELLS), meta_table(cell_id=meta_names))
    message = str(info.value)
    assert "37 of the embedding's 100 cells (37%) are in the metadata" in message
    assert (
        "63 embedding cell(s) are not in the metadata ('cell037', 'cell038', 'cell039', "
        "'cell040', 'cell041', ...)" in message
    )
    assert "63 metadata name(s) are not in the embedding ('other000'" in message


def test_superset_metadata_is_an_error():
    with pytest.raises(ValueError, match="1 metadata name"):
        match(named(CELLS), meta_table(cell=CELLS + ["extra"]))


def test_row_order_when_a_side_has_no_names(caplog):
    unnamed = Table(pd.DataFrame({"PC1": np.zeros(100)}), False)
    result = match(unnamed, meta_table(cell=CELLS[::-1]))
    assert not result.by_name and result.meta["cell"].iloc[0] == "cell099"
    with pytest.raises(ValueError, match="has 99 rows but the embedding pcs.tsv has 100 cells"):
        match(unnamed, meta_table(cell=CELLS[:99]))
    # A column that shares nothing and is not under an identifier header holds data.
    result = match(named(CELLS), meta_table(sample=[f"s{i}" for i in range(100)]))
    assert not result.by_name
    # ... as does an identifier-like header over repeated values (sample names).
    assert not match(named(CELLS), meta_table(name=[f"s{i % 4}" for i in range(100)])).by_name
    # Integer row names that share nothing (a filtered frame's index written by
    # pandas) are taken for row numbers, with a warning.
    filtered = Table(pd.DataFrame({"x": range(100)}, index=range(0, 300, 3)), True)
    with caplog.at_level(logging.WARNING, logger="harmonypy.io.names"):
        assert not match(named(CELLS), filtered).by_name
    assert "shares none" in caplog.text
    # Embedding names that only number the rows are no names.
    assert not match(named(list(range(100))), meta_table(cell_id=CELLS)).by_name


def test_row_order_says_so_and_carries_the_metadatas_names(caplog):
    """An embedding without cell names (.npy, .zarr) beside metadata that names
    its cells, in any order: paired by position (the documented rule), said at
    INFO and by describe(), and the metadata's names become the cells' names
    (so that outputs keep them)."""
    unnamed = Table(pd.DataFrame({"PC1": np.zeros(100)}), False)
    donor = [f"d{i % 3}" for i in range(100)]
    with caplog.at_level(logging.INFO, logger="harmonypy.io.names"):
        result = match(unnamed, meta_table(cell=CELLS[::-1], donor=donor))
    assert not result.by_name and list(result.names) == CELLS[::-1]
    for text in (result.describe(), caplog.text):
        assert "by position" in text and "pcs.tsv has no cell names" in text, text
        assert "named by the metadata's column 'cell'" in text, text
    rows = Table(pd.DataFrame({"donor": donor}, index=CELLS), True, "row names")
    result = match(unnamed, rows)
    assert list(result.names) == CELLS and "metadata's row names" in result.describe()
    # Metadata without names (or with repeated ones): paired by position, said so.
    for meta in (
        meta_table(donor=donor),
        Table(pd.DataFrame({"donor": donor}, index=CELLS[:50] * 2), True),
    ):
        result = match(unnamed, meta)
        assert result.names is None and "by position" in result.describe()
        assert "named by" not in result.describe()
    # --no-names: the embedding keeps its own names.
    assert match(named(CELLS), meta_table(cell=CELLS[::-1]), by_name=False).names is None


# Issue #11: both files name their cells, but no name is shared.
BARCODES = [f"AAAC{i}-1" for i in range(100)]
STRIPPED = [f"AAAC{i}" for i in range(100)][::-1]


def test_names_sharing_nothing_are_an_error_not_row_order(tmp_path):
    # The files, read as the command line reads them.
    pcs = pcs_frame(100)
    pcs.insert(0, "cell_id", BARCODES)
    pcs.to_csv(tmp_path / "pcs.tsv", sep="\t", index=False)
    meta = pd.DataFrame({"cell_id": STRIPPED, "donor": [f"d{i % 2}" for i in range(100)]})
    meta.to_csv(tmp_path / "meta.tsv", sep="\t", index=False)
    embedding, metadata = read_embedding(tmp_path / "pcs.tsv"), read_meta(tmp_path / "meta.tsv")
    with pytest.raises(ValueError) as info:
        match(embedding, metadata)
    message = str(info.value)
    assert (
        "the embedding pcs.tsv (column 'cell_id') and the metadata meta.tsv (column "
        "'cell_id') name different cells: 0 of the embedding's 100 cells (0%) are in the "
        "metadata"
    ) in message
    assert "100 embedding cell(s) are not in the metadata ('AAAC0-1', 'AAAC1-1'," in message
    assert "100 metadata name(s) are not in the embedding ('AAAC99', 'AAAC98'," in message
    assert "--names/--meta-names" in message and "--no-names" in message
    # --no-names pairs by position, as asked.
    result = match(embedding, metadata, by_name=False)
    assert not result.by_name and result.meta["cell_id"].iloc[0] == "AAAC99"


@pytest.mark.parametrize(
    "meta",
    [
        Table(pd.DataFrame({"donor": ["a"] * 100}, index=STRIPPED), True, "row names"),
        meta_table(barcode=STRIPPED, donor=["a"] * 100),
        meta_table(**{"Cell ID": pd.Categorical(STRIPPED)}),
        # Integer row names (positions) next to a name column: the column counts.
        Table(pd.DataFrame({"obs_names": STRIPPED}, index=range(1, 201, 2)), True, "row names"),
    ],
    ids=["row names", "barcode", "categorical Cell ID", "obs_names beside integer row names"],
)
def test_names_sharing_nothing_in_any_source_are_an_error(meta):
    with pytest.raises(ValueError, match=r"0 of the embedding's 100 cells \(0%\).*'AAAC0-1'"):
        match(named(BARCODES), meta)


def test_row_numbers_are_not_names():
    # pandas numbers rows 0..N-1, R's write.table 1..N: pair by row order.
    pandas_numbers = named(list(range(100)))
    r_numbers = Table(pd.DataFrame({"x": range(100)}, index=pd.Index(range(1, 101))), True)
    assert not match(pandas_numbers, r_numbers).by_name


def test_integer_names_ignore_integer_data_columns():
    ids = list(range(5000, 5100))
    shuffled = np.random.default_rng(3).permutation(ids)
    meta = meta_table(
        n_genes=np.arange(5050, 5150), leiden=[str(i % 7) for i in range(100)], cell_id=shuffled
    )
    result = match(named(ids), meta)
    assert result.names_from == "column 'cell_id'" and list(result.meta["cell_id"]) == ids
    # Without an identifier column the overlapping counts are not names.
    assert not match(named(ids), meta_table(n_genes=np.arange(5050, 5150))).by_name


def test_meta_names_option_and_no_names():
    meta = meta_table(a=CELLS[::-1], b=CELLS)
    assert match(named(CELLS), meta, meta_names="a").reordered
    assert match(named(CELLS), meta, meta_names="b").names_from == "column 'b'"
    with pytest.raises(KeyError, match="did you mean 'b'"):
        match(named(CELLS), meta, meta_names="B ")
    result = match(named(CELLS), meta, by_name=False)
    assert not result.by_name and result.meta["a"].iloc[0] == "cell099"
    with pytest.raises(ValueError, match="has no cell names"):
        match(Table(pd.DataFrame({"PC1": np.zeros(100)}), False), meta, meta_names="a")


def test_categorical_name_column():
    meta = Table(pd.DataFrame({"cell": pd.Categorical(CELLS[::-1])}), False)
    assert match(named(CELLS), meta).reordered


# -------------------------------------------------------- output checks
def spec(path, formats=TABLES, option="-o/--output"):
    return OutputSpec(option, path, formats)


def test_output_that_is_an_input_is_refused(tmp_path):
    meta = tmp_path / "meta.tsv"
    meta.write_text("donor\na\n")
    (tmp_path / "sub").mkdir()
    os.symlink(meta, tmp_path / "link.tsv")
    os.link(meta, tmp_path / "hard.tsv")
    for output in (
        meta,
        tmp_path / "sub" / ".." / "meta.tsv",
        tmp_path / "link.tsv",
        tmp_path / "hard.tsv",
    ):
        with pytest.raises(ValueError, match="is the input META"):
            check_outputs(
                [spec(output)], {"EMBEDDING": tmp_path / "pcs.tsv", "META": meta}, force=True
            )
    assert meta.read_text() == "donor\na\n"


def test_outputs_must_differ(tmp_path):
    out = tmp_path / "out.png"
    with pytest.raises(ValueError, match="--plot and -o/--output name the same file"):
        check_outputs([spec(out, None), spec(out, None, "--plot")], {}, force=True)


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out.tsv"
    out.write_text("old")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        check_outputs([spec(out)], {}, force=False)
    check_outputs([spec(out)], {}, force=True)
    assert out.read_text() == "old"  # checking writes nothing


def test_special_file_output_is_refused(tmp_path):
    fifo = tmp_path / "pipe.tsv"
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        check_outputs([spec(fifo)], {}, force=True)


def test_output_folder_checks(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        check_outputs([spec(tmp_path / "no" / "out.tsv")], {}, force=False)
    (tmp_path / "dir.tsv").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_outputs([spec(tmp_path / "dir.tsv")], {}, force=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        check_outputs([spec(tmp_path / "file" / "out.tsv")], {}, force=False)
    with pytest.raises(ValueError, match="format 'h5ad' not possible"):
        check_outputs([spec(tmp_path / "out.h5ad")], {}, force=False)
    # Root may write anywhere, so the permission check is exercised through os.access.
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="no permission to write"):
        check_outputs([spec(tmp_path / "out.tsv")], {}, force=False)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_plot_extension_must_be_supported(tmp_path):
    for name in ("a.png", "a.PDF", "a.svg"):
        check_outputs([spec(tmp_path / name, None, "--plot")], {}, force=False)
    for name in ("a.xyz", "plot"):
        with pytest.raises(ValueError, match="matplotlib cannot write .*png"):
            check_outputs([spec(tmp_path / name, None, "--plot")], {}, force=False)


# ------------------------------------------------------------- writing
def test_outputs_go_through_temporary_files(tmp_path):
    table = Table(pcs_frame(), False)
    seen = []
    with OutputFiles() as files:
        for name in ("out.tsv.gz", "out.npy"):
            temporary = files.stage(tmp_path / name)
            seen.append(temporary)
            assert temporary.parent == tmp_path
            assert temporary.name.startswith(".out.")  # the extension once, at the end
            assert temporary.name.count(name[3:]) == 1
            assert temporary.name.endswith(".tmp" + name[3:])  # .tmp.tsv.gz, .tmp.npy
            write_table(table, temporary)
            assert not (tmp_path / name).exists()
        files.commit()
    assert not any(path.exists() for path in seen) and leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy", "out.tsv.gz"]
    np.testing.assert_allclose(pd.read_csv(tmp_path / "out.tsv.gz", sep="\t"), table.frame)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), table.frame.to_numpy())


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_while_writing_keeps_previous_files(tmp_path, failure):
    first, second = tmp_path / "out.tsv", tmp_path / "plot.csv"
    first.write_text("previous\n")
    with pytest.raises(type(failure)):
        with OutputFiles() as files:
            write_table(Table(pcs_frame(), False), files.stage(first))
            partial = files.stage(second)
            partial.write_text("half")
            raise failure
    assert first.read_text() == "previous\n" and not second.exists()
    assert leftovers(tmp_path) == []


def test_ctrl_c_during_the_renames_is_held_back(
    tmp_path, monkeypatch, sigint_is_keyboard_interrupt
):
    # A SIGINT that lands between the two renames must not leave one new and
    # one old output: it is delivered after both are in place.
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(source, destination):
        real_replace(source, destination)
        calls.append(destination)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(outputs.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with OutputFiles() as files:
            for name in ("a.csv", "b.csv"):
                write_table(Table(pcs_frame(), False), files.stage(tmp_path / name))
            files.commit()
    assert len(calls) == 2 and (tmp_path / "a.csv").exists() and (tmp_path / "b.csv").exists()
    assert leftovers(tmp_path) == []


def test_failed_rename_says_what_was_written(tmp_path, monkeypatch):
    real_replace = os.replace

    def fail_second(source, destination):
        if str(destination).endswith("b.csv"):
            raise OSError(28, "No space left on device", str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(outputs.os, "replace", fail_second)
    with pytest.raises(RuntimeError, match=r"b.csv: No space left .*already written: .*a.csv"):
        with OutputFiles() as files:
            for name in ("a.csv", "b.csv"):
                write_table(Table(pcs_frame(), False), files.stage(tmp_path / name))
            files.commit()
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_file_modes_and_symlinks(tmp_path):
    umask = os.umask(0o022)
    try:
        old, new = tmp_path / "old.csv", tmp_path / "new.csv"
        old.write_text("x")
        old.chmod(0o640)
        target = tmp_path / "target.csv"
        target.write_text("x")
        os.symlink(target, tmp_path / "link.csv")
        with OutputFiles() as files:
            for path in (old, new, tmp_path / "link.csv"):
                write_table(Table(pcs_frame(), False), files.stage(path))
            files.commit()
        assert stat.S_IMODE(old.stat().st_mode) == 0o640  # kept
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # 0o666 less the umask
        assert (tmp_path / "link.csv").is_symlink()  # the link's target is replaced
        assert target.read_text().startswith("PC1") and files.replaced[-1] == target
    finally:
        os.umask(umask)


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed")
def test_table_round_trip(tmp_path):
    frame = pcs_frame().set_axis(pd.Index([f"c{i}" for i in range(60)], name="cell"))
    for name in ("t.tsv", "t.csv.gz", "t.parquet"):
        with OutputFiles() as files:
            write_table(Table(frame, True), files.stage(tmp_path / name))
            files.commit()
        back = read_embedding(tmp_path / name)
        assert list(back.names) == list(frame.index)
        np.testing.assert_allclose(back.frame.to_numpy(), frame.to_numpy())


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_save_figure_uses_the_real_extension(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1])
    with OutputFiles() as files:
        save_figure(fig, files.stage(tmp_path / "p.svg"))
        files.commit()
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


def test_interrupt_inside_a_reader_is_an_interrupt_not_a_bad_file(
    tmp_path, sigint_is_keyboard_interrupt
):
    """pandas' C reader reports a Ctrl-C in its read() callback as a ParserError."""
    import signal as signal_module

    path = tmp_path / "pcs.tsv"
    path.write_text("a\tb\n1\t2\n")
    with pytest.raises(KeyboardInterrupt):
        with readers._reading(path, "embedding"):
            try:
                signal_module.raise_signal(signal_module.SIGINT)
            except KeyboardInterrupt:
                raise pd.errors.ParserError(
                    "Error tokenizing data. C error: Calling read(nbytes) on source failed"
                ) from None
    with pytest.raises(ValueError, match="cannot read .* malformed table"):
        with readers._reading(path, "embedding"):
            raise pd.errors.ParserError("bad")


# ------------------------------------------------------------------ Zarr input
def test_zarr_embedding_gives_the_npy_result(tmp_path):
    zarr = pytest.importorskip("zarr")

    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 6)).astype(np.float32)
    array = zarr.create_array(
        str(tmp_path / "pcs.zarr"), shape=z.shape, dtype=z.dtype, chunks=(64, 6)
    )
    array[...] = z
    group = zarr.open_group(str(tmp_path / "adata.zarr"), mode="w")
    inner = group.require_group("obsm").create_array(
        "X_pca", shape=z.shape, dtype=z.dtype, chunks=(64, 6)
    )
    inner[...] = z
    assert file_format(tmp_path / "adata.zarr" / "obsm" / "X_pca") == "zarr"
    for path in [tmp_path / "pcs.zarr", tmp_path / "adata.zarr" / "obsm" / "X_pca"]:
        table = read_embedding(path)
        assert not table.has_names
        np.testing.assert_array_equal(table.frame.to_numpy(), z)
        assert table.frame.to_numpy().dtype == np.float32
    with pytest.raises(ValueError, match=r"Zarr group, not an array.*adata.zarr/obsm/X_pca"):
        read_embedding(tmp_path / "adata.zarr")
    with pytest.raises(ValueError, match="--names"):
        read_embedding(tmp_path / "pcs.zarr", names="cell")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_embedding(tmp_path)  # any other folder is still refused


def test_header_only_embedding_is_empty_not_non_numeric(tmp_path):
    pd.DataFrame(columns=["cell", "PC1", "PC2"]).to_csv(
        tmp_path / "empty.tsv", sep="\t", index=False
    )
    with pytest.raises(
        ValueError,
        match=r"embedding .*empty\.tsv has no cells \(only a "
        r"header\)",
    ):
        read_embedding(tmp_path / "empty.tsv")


def test_zarr_group_hint_suggests_embeddings_first(tmp_path):
    """An AnnData store given as a whole: the hint names its embeddings
    (obsm/*) before X and the other 2-D arrays, and no 1-D obs column."""
    zarr = pytest.importorskip("zarr")

    group = zarr.open_group(str(tmp_path / "adata.zarr"), mode="w")
    for path, shape in [
        ("X", (50, 30)),
        ("layers/counts", (50, 30)),
        ("obs/_index", (50,)),
        ("obs/n_genes", (50,)),
        ("obsm/X_pca", (50, 6)),
        ("obsm/X_umap", (50, 2)),
        ("varm/PCs", (30, 6)),
    ]:
        folder, _, name = path.rpartition("/")
        parent = group.require_group(folder) if folder else group
        parent.create_array(name, shape=shape, dtype=np.float32)
    with pytest.raises(ValueError) as info:
        read_embedding(tmp_path / "adata.zarr")
    hint = str(info.value).split("e.g. ", 1)[1]
    shown = [part.rsplit("adata.zarr/", 1)[1] for part in hint.split(", ")]
    assert shown[:2] == ["obsm/X_pca", "obsm/X_umap"], hint
    assert "X" in shown and not any(p.startswith("obs/") for p in shown), hint
