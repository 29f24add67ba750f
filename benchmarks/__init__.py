"""Benchmarks of the package: run each from the repository root as ``python -m benchmarks.NAME``
(see docs/benchmarks.md); ``benchmarks._common`` holds what they share."""
