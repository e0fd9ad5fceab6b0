"""Benchmarks that measure ember against baselines run in the same process run."""
