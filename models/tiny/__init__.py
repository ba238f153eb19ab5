"""Recipes for tiny random-weight checkpoints of real architectures (tests, demo, benchmarks)."""
