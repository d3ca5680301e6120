"""Triton kernels of iics_fast, installed as the subpackage `iics_fast.kernels`.

Each module holds the plain-PyTorch `*_ref`, the `@triton.jit` kernels and their launchers.
Triton is imported only when a kernel module is imported. On a machine without a GPU set
TRITON_INTERPRET=1 before importing a kernel module to run kernels in Triton's interpreter.
"""
