"""Benchmarks of the o2mag_kernels op (pytest-benchmark; run with --benchmark-enable)."""
