"""Test set-up: without CUDA, Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, hence here.
"""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng(request):
    """A fresh generator a test, seeded from the test's name so failures reproduce."""
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
