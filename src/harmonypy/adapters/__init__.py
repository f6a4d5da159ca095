"""The AnnData/scanpy layer: integrate, harmony_integrate and the public mapping
functions that accept AnnData; the only layer (with io) that knows AnnData."""
