"""Reference mapping (Symphony): the reference and its file format, gene projection, query mapping and label transfer, on the engine's kernels."""
