"""Benchmarks of mome_rec against its own baselines and torch-rechub; run ``python -m benchmarks.run``."""
