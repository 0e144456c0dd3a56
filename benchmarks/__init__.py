"""Benchmarks of sacpo against TRL 1.x: `python -m benchmarks.run [--quick]` (see run.py)."""
