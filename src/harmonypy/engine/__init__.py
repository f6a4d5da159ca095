"""The Harmony engine: R's steps (harmony.py), run_harmony's front end and checks, the
clustering and correction kernels, the one k-means, the batch design and the one
reduction point. Knows nothing of files, AnnData or processes."""
