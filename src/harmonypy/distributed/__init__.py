"""Runs over several processes: the local launcher (--nproc, integrate(nproc=)); the group reduction itself is the engine's reduce module."""
