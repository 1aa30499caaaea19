"""Micro-benchmarks that `kdplan profile` runs under torchrun (see run.py)."""
