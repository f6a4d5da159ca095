"""What a mapping of an AnnData query records and writes, and what it may replace.

A mapping writes the corrected query to ``obsm``, the mapping score and
transferred labels to ``obs``, and a record of what it did to
``uns["harmony_mapping"]`` (:func:`mapping_record`, :func:`write_transfer`).
The record is also what lets a later mapping replace its own entries, and
only those: :func:`check_replaceable` refuses to write over ``obsm``/``obs``
entries that no earlier mapping wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from harmonypy import __version__
from harmonypy.engine import validation as val
from harmonypy.mapping.reference import reference_digest

__all__ = [
    "MAPPING_KEY",
    "PROJECTED_BASIS",
    "SCORE_COLUMN",
    "check_replaceable",
    "label_columns",
    "mapping_record",
    "write_transfer",
]

#: ``obsm`` key of a query projected from genes (its uncorrected reference PCs).
PROJECTED_BASIS = "X_pca_reference"
#: ``obs`` column of the per-cell mapping score.
SCORE_COLUMN = "mapping_score"
#: ``uns`` key of what :func:`map_anndata` did.
MAPPING_KEY = "harmony_mapping"


def mapping_record(q, ref, *, basis, adjusted, keys, n_missing) -> dict[str, Any]:
    """``uns["harmony_mapping"]``: what a mapping did and wrote (see map_query)."""
    record = {
        "basis": PROJECTED_BASIS if basis is None else basis,
        "adjusted_basis": adjusted,
        "projected_from_genes": basis is None,
        "reference_algorithm": ref.algorithm,
        "n_clusters": int(ref.K),
        "batch_levels": [str(level) for level in q.batch_levels],
        "mapping_score": q.confidence is not None,
        "reference_digest": reference_digest(ref),
        "version": __version__,
    }
    if n_missing is not None:
        record.update(n_genes=int(ref.projection.n_genes), n_genes_missing=int(n_missing))
    if keys:
        record["key"] = keys
    return record


def label_columns(label_names) -> list[str]:
    """The ``obs`` columns label transfer writes for each label."""
    return [f"{name}_{what}" for name in label_names for what in ("predicted", "probability")]


def _mapping_outputs(record) -> set[str]:
    """``obsm[...]``/``obs[...]`` entries an earlier mapping recorded writing."""
    if not isinstance(record, dict) or "adjusted_basis" not in record:
        return set()
    own = {f"obsm[{str(record['adjusted_basis'])!r}]"}
    if record.get("projected_from_genes", False):
        own.add(f"obsm[{PROJECTED_BASIS!r}]")
    if record.get("mapping_score", True):
        own.add(f"obs[{SCORE_COLUMN!r}]")
    labels = np.atleast_1d(np.asarray(record.get("labels", []), dtype=object))
    own.update(f"obs[{column!r}]" for column in label_columns(map(str, labels)))
    return own


def check_replaceable(
    adata: Any,
    obsm_keys: Sequence[str],
    obs_columns: Sequence[str],
    *,
    overwrite: bool,
    adjusted_basis: str | None = None,
) -> None:
    """Refuse to write over ``obsm``/``obs`` entries that no earlier mapping wrote.

    As :func:`integrate` never writes over the embedding it reads, a mapping
    never silently replaces what something else put in the query (its own
    Harmony correction by :func:`integrate` under ``X_pca_harmony``, the
    user's columns). What an earlier mapping recorded in
    ``uns["harmony_mapping"]`` is replaced: mapping again asks for that.
    """
    if val.check_flag("overwrite", overwrite):
        return
    own = _mapping_outputs(adata.uns.get(MAPPING_KEY))
    obs = {str(c) for c in adata.obs.columns}
    taken = [f"obsm[{key!r}]" for key in obsm_keys if key in adata.obsm] + [
        f"obs[{column!r}]" for column in obs_columns if column in obs
    ]
    taken = [entry for entry in taken if entry not in own]
    if not taken:
        return
    remedies = ["pass overwrite=True to replace them"]
    if adjusted_basis is not None and f"obsm[{adjusted_basis!r}]" in taken:
        remedies.insert(
            0,
            f"write the mapped query elsewhere with adjusted_basis=KEY (e.g. "
            f"adjusted_basis={adjusted_basis + '_mapped'!r})",
        )
    raise ValueError(
        f"adata_query already has {', '.join(taken)}, which no earlier mapping wrote (e.g. "
        f"the query's own Harmony correction by hm.integrate, or your own entries): writing "
        f"there would lose them; {', or '.join(remedies)}, or move them first"
    )


def write_transfer(adata: Any, record: dict, name, table, k: int, min_probability: float) -> None:
    """Labels of ``table`` into ``adata.obs`` and the record: ``labels``, ``k`` and
    ``min_probability`` are parallel lists, one entry per transferred label
    (a label transferred again replaces its entry)."""
    adata.obs[f"{name}_predicted"] = table["label"].values  # categorical
    adata.obs[f"{name}_probability"] = table["probability"].to_numpy()
    labels = [str(n) for n in record.get("labels", [])]
    ks = [int(v) for v in np.atleast_1d(record.get("k", []))]
    probabilities = [float(v) for v in np.atleast_1d(record.get("min_probability", []))]
    if not len(labels) == len(ks) == len(probabilities):  # not written by this package
        labels, ks, probabilities = [], [], []
    if str(name) in labels:
        i = labels.index(str(name))
        del labels[i], ks[i], probabilities[i]
    record.update(
        labels=labels + [str(name)],
        k=ks + [int(k)],
        min_probability=probabilities + [float(min_probability)],
    )
