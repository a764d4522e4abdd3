"""pytest wiring of the benchmark harness (fastgen/benchmarking.py): its options."""
from fastgen.benchmarking import pytest_addoption, pytest_configure, pytest_unconfigure  # noqa: F401  (pytest hooks)
