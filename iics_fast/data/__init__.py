"""Data side of iics_fast: datasets, transforms and samplers."""
