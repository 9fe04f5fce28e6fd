"""LRQ-DiT, HALO, Hub export and the Optimum CLI commands."""
