"""Benchmarks (not tests): each workload module has `run() -> list[Row]`; `python -m benchmarks`."""
