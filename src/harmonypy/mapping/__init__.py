"""Reference mapping (Symphony): the reference and its file format, gene projection,
query mapping, the mapping score and label transfer, on the engine's kernels."""
