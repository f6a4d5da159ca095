"""Label transfer from a reference to mapped query cells: Symphony's ``knnPredict``.

:func:`transfer_labels` votes among each query cell's k nearest reference
cells (Euclidean, in the corrected space; immunogenomics/symphony
``R/utils.R``). The search is :mod:`harmonypy.neighbors`' (every pair for
small searches, the pruned exact index above). This module knows only
arrays: an AnnData query is taken by the adapter layer
(:mod:`harmonypy.adapters.mapping_api`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from harmonypy.engine import validation as val
from harmonypy.engine.cellnames import carries_names
from harmonypy.engine.device import resolve_device
from harmonypy.mapping.query import MappedQuery, query_cells
from harmonypy.mapping.reference import Reference, reference_digest
from harmonypy.neighbors import PrunedIndex, exact_topk

__all__ = ["UNKNOWN", "transfer_labels"]

#: Label given to query cells whose best label has too few votes.
UNKNOWN = "unknown"
#: Label transfer's search: reference cells per block, most query cells per
#: block, and query x reference distances held at once (32 MB of float32).
_KNN_REF_CHUNK = 32768
_KNN_QUERY_CHUNK = 4096
_KNN_ELEMENTS = 2**23
#: Query x reference pairs up to which label transfer compares every pair;
#: above, the reference is partitioned into lists of about
#: :data:`_KNN_LIST_SIZE` cells and lists that cannot hold a neighbour are
#: skipped (still exact, see :class:`harmonypy.neighbors.PrunedIndex`). Query
#: cells grouped at once by their nearest list: :data:`_KNN_GROUP_CHUNK`.
_KNN_BRUTE_PAIRS = 2**26
_KNN_LIST_SIZE = 256
_KNN_MAX_LISTS = 1024
_KNN_GROUP_CHUNK = 2**18
_KNN_FIRST_CELLS = 4096


def transfer_labels(
    query, ref: Reference, label: str, k: int = 5, min_probability: float = 0.5, *, device=None
) -> pd.DataFrame:
    """Labels for query cells by a vote of their k nearest reference cells.

    The array layer of :func:`harmonypy.transfer_labels`, which also takes an
    AnnData query (and whose docstring describes the vote): Symphony's
    ``knnPredict``, Euclidean distances in the corrected space between the
    query cells and the reference cells kept in ``ref``; the label most
    frequent among the ``k`` nearest wins with its share of the votes as its
    probability, ties going to the nearer neighbour's label; below
    ``min_probability`` the label is ``"unknown"``.

    Parameters
    ----------
    query : MappedQuery, or array (N_q, d) of corrected query cells
    ref : Reference
        Built with ``keep_cells=True`` and ``labels`` including ``label``.
    label : str
        A label column of ``ref``.
    k : int, default 5
    min_probability : float in [0, 1], default 0.5
    device : optional
        Where to search (default: CUDA, then MPS, then the CPU).

    Returns
    -------
    DataFrame with columns ``label`` (categorical) and ``probability``, one row
    per query cell (indexed by the query's cell names when it has them).
    """
    if not isinstance(ref, Reference):
        raise TypeError(f"ref must be a harmonypy Reference, not {type(ref).__name__}")
    if not isinstance(label, str):
        raise TypeError(
            f"label must be one label column's name (a str), got {label!r}; "
            f"transfer several one at a time (map_query(adata_query, ref, "
            f"labels=[...]) takes a list)"
        )
    mapped_onto = getattr(query, "reference_digest", None)  # None: pickled without one
    if isinstance(query, MappedQuery) and mapped_onto not in (None, reference_digest(ref)):
        raise ValueError(
            f"the query was mapped onto another reference (its reference_digest "
            f"{mapped_onto!r}, this reference's {reference_digest(ref)!r}): transfer labels "
            f"from the reference it was mapped onto, or map it onto this one"
        )
    if ref.cells is None:
        raise ValueError(
            "the reference keeps no cells (built with keep_cells=False): label "
            "transfer needs them; rebuild it with keep_cells=True"
        )
    if ref.labels is None or label not in ref.label_columns:
        raise ValueError(
            f"label {label!r} is not a label column of the reference; it has "
            f"{ref.label_columns or 'none'} (build_reference(..., labels=[...]))"
        )
    min_probability = val.check_real("min_probability", min_probability)
    if not 0 <= min_probability <= 1:
        raise ValueError(f"min_probability must be in [0, 1], got {min_probability}")
    if isinstance(query, MappedQuery):
        cells, names = query.result(), query.cell_names
    else:
        cells, names = query_cells(query, None, ref.d), None
        if isinstance(query, pd.DataFrame) and carries_names(query.index):
            names = query.index
    column = ref.labels[label]
    codes = column.cat.codes.to_numpy()
    labelled = codes >= 0
    n_labelled = int(labelled.sum())
    if n_labelled == 0:
        raise ValueError(f"no reference cell has a {label!r} label")
    k = val.check_int("k", k, 1, n_labelled, maximum_is="the labelled reference cells")
    torch_device = resolve_device(device)
    dtype = (
        torch.float64 if cells.dtype == np.float64 and torch_device.type != "mps" else torch.float32
    )
    with torch.no_grad():
        reference = torch.as_tensor(ref.cells[labelled], device=torch_device).to(dtype)
        ref_codes = torch.as_tensor(codes[labelled].astype(np.int64), device=torch_device)
        best, votes = _knn_vote(
            cells,
            reference,
            ref_codes=ref_codes,
            n_labels=len(column.cat.categories),
            k=k,
            dtype=dtype,
            device=torch_device,
        )
    probability = votes / k
    categories = list(column.cat.categories)
    unknown = probability < min_probability
    if unknown.any() and UNKNOWN not in categories:
        categories.append(UNKNOWN)
    out_codes = np.where(unknown, categories.index(UNKNOWN) if unknown.any() else 0, best)
    # pandas-stubs type codes as Sequence[int]; pandas takes the int array as is.
    labels = pd.Categorical.from_codes(out_codes, categories=pd.Index(categories))  # type: ignore[arg-type]
    index = names if names is not None else pd.RangeIndex(len(cells))
    return pd.DataFrame({"label": labels, "probability": probability}, index=index)


def _knn_vote(cells, reference, *, ref_codes, n_labels, k, dtype, device):
    """Majority label among each query cell's k nearest reference cells.

    Neighbours are ranked by ``|r|^2 - 2 q.r`` (the query's own ``|q|^2`` does
    not change the order). Small searches compare every pair, one block of
    query cells against one block of reference cells at a time, keeping a
    running top k; larger ones skip the reference lists that cannot hold a
    neighbour (:class:`harmonypy.neighbors.PrunedIndex`), with the same result.

    Returns ``(label code (N,), votes (N,))`` as NumPy arrays.
    """
    n_query, n_ref = cells.shape[0], reference.shape[0]
    best = np.empty(n_query, dtype=np.int64)
    votes = np.empty(n_query, dtype=np.float64)
    ranks = torch.arange(k, device=device)
    if n_query * n_ref <= _KNN_BRUTE_PAIRS or n_ref < 2 * _KNN_LIST_SIZE:
        ref_chunk = min(n_ref, _KNN_REF_CHUNK)
        query_chunk = max(1, min(_KNN_QUERY_CHUNK, _KNN_ELEMENTS // ref_chunk))
        mean = reference.to(torch.float64).mean(0).to(dtype)  # centred: less rounding
        centred = reference - mean
        ref_sq = (centred * centred).sum(1)

        def search(q):
            return exact_topk(q - mean, centred, data_sq=ref_sq, k=k, chunk=ref_chunk)[1]
    else:
        query_chunk = _KNN_GROUP_CHUNK
        index = PrunedIndex(
            reference,
            k=k,
            list_size=_KNN_LIST_SIZE,
            max_lists=_KNN_MAX_LISTS,
            first_cells=_KNN_FIRST_CELLS,
        )

        def search(q):
            return index.search(q, elements=_KNN_ELEMENTS)

    for start in range(0, n_query, query_chunk):
        q = torch.as_tensor(np.asarray(cells[start : start + query_chunk]), device=device).to(dtype)
        neighbour_codes = ref_codes[search(q)]  # (n, k), nearest first
        counts = torch.zeros((q.shape[0], n_labels), dtype=torch.int64, device=device)
        counts.scatter_add_(1, neighbour_codes, torch.ones_like(neighbour_codes))
        first = torch.full((q.shape[0], n_labels), k, dtype=torch.int64, device=device)
        first.scatter_reduce_(1, neighbour_codes, ranks.expand_as(neighbour_codes), "amin")
        winner = (counts * (k + 1) + (k - first)).argmax(1)
        best[start : start + q.shape[0]] = winner.cpu().numpy()
        votes[start : start + q.shape[0]] = counts.gather(1, winner[:, None])[:, 0].cpu().numpy()
    return best, votes
