"""Benchmarks (plain scripts, not tests): ``python -m bench.<name> [--quick]``. Results: docs/benchmarks.md."""
