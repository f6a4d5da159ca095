"""File I/O of the command line, one module per job.

* :mod:`~harmonypy.io.formats`: the format of a file from its name.
* :mod:`~harmonypy.io.tables`: the :class:`~harmonypy.io.tables.Table` a file is
  read into, and the column tests reading and matching share.
* :mod:`~harmonypy.io.readers`: embeddings, metadata tables and ``.h5ad`` files,
  every failure a ``ValueError`` naming the file.
* :mod:`~harmonypy.io.names`: pairing the metadata's rows with the embedding's
  cells, by name or by position.
* :mod:`~harmonypy.io.outputs`: output checks before the computation, and the one
  atomic write (temporary files renamed into place together).
* :mod:`~harmonypy.io.writers`: one writer per kind of output.
"""
