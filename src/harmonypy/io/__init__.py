"""File I/O: formats, reading tables and embeddings, matching cells by name, outputs written through a temporary file renamed into place."""
