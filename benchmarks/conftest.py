"""pytest wiring of the benchmark harness (fastgen/benchmarking.py): its options."""
from fastgen.benchmarking import pytest_addoption  # noqa: F401  (a pytest hook)
