"""Benchmarks and development tools of iics_fast (not installed with the package): pytest
benchmarks (`pytest benchmarks/`), the round profiler (`python -m benchmarks.profile`), the
reference pipeline it is measured against (`benchmarks.reference`) and the static GPU report
(`python -m benchmarks.gpu_report`, specs in `benchmarks.gpu_specs`). Run from the repository
root."""
