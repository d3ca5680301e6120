"""Test set-up: without CUDA, Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, hence here.

Every test draws from generators seeded by the CRC-32 of its node id (stable across runs,
processes and machines, unlike Python's salted hash()): the `rng` fixture, and torch's, NumPy's
and Python's global generators, reseeded before each test so that a test reproduces the same
alone as within the suite.
"""
import os
import random
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def node_seed(request) -> int:
    """The seed of the requesting test: the CRC-32 of its node id (relative to the root)."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    seed = node_seed(request)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped, with the reason, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where kernel tests put their tensors: the GPU when there is one (compiled kernels), else
    the CPU (Triton's interpreter, the C++ paths)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def rng(request):
    """A fresh generator a test, seeded from the test's node id so failures reproduce."""
    return np.random.default_rng(node_seed(request))
