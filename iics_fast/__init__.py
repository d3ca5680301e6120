"""iics_fast: fast, faithful IICS (intra-inter camera similarity) for unsupervised person re-ID.

Submodules are imported on use, so `import iics_fast` stays light (no Triton, no extension load).
"""
__version__ = "0.1.0"
