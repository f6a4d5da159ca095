"""Runs over several processes: the rank-agreement checks (checks), the distributed
k-means start (start) and the local launcher (launch: --nproc, integrate(nproc=)) with
its processes (child) and their shared memory (shared_memory); the group reduction
itself is the engine's reduce module."""
