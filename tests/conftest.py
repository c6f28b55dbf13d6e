"""Test-wide settings.

TRITON_INTERPRET must be set before triton is first imported: every kernel test runs the Triton kernels on CPU
tensors through the interpreter. The offline GPU compile checks run in a subprocess without it
(tests/kernels/test_compile.py).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

pytest.register_assert_rewrite("helpers")  # detailed assert messages in the shared helpers too

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from groupnet.ops import use_backend  # noqa: E402

settings.register_profile(
    "groupnet",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "groupnet"))

# Test ops are tiny: a second intra-op thread only adds synchronisation, and on a shared 2-core machine its
# spin-waits make a tiny model's forward/backward about 100x slower (7.5 s against 0.05 s).
torch.set_num_threads(1)


@pytest.fixture
def triton_backend():
    """Route the grouped ops to the Triton kernels (run by the interpreter on CPU tensors)."""
    with use_backend("triton"):
        yield


@pytest.fixture
def torch_backend():
    """Route the grouped ops to the torch path."""
    with use_backend("torch"):
        yield
