"""Benchmarks: each comparison runs side by side in one run and prints a table (``python -m bench``)."""
