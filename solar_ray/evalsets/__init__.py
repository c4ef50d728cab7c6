"""Evaluation data: real benchmark items offline (:mod:`solar_ray.evalsets.benchmarks`)."""

from solar_ray.evalsets.benchmarks import (
    BENCHMARKS,
    Benchmark,
    BenchmarkDataError,
    ensure_benchmarks,
    item_texts,
    load_task,
)

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkDataError", "ensure_benchmarks", "item_texts", "load_task"]
