"""Evaluation: harmfulness judges and capability benchmarks."""
