"""Benchmarks that print comparable numbers: each figure beside a reference measured in the same run."""
