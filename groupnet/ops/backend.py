"""The backend switch: which implementation the grouped ops run, torch's or groupnet's Triton kernels.

Precedence, highest first:

1. :func:`use_backend` (a setter, and a context manager that restores the previous choice on exit);
2. the environment variable ``GROUPNET_BACKEND`` (``torch``, ``triton`` or ``auto``), read once, at the first op call;
3. ``auto``: CUDA tensors run the Triton kernels when triton can be imported, everything else runs torch.

``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before triton is imported (the kernels then run on the
interpreter, as the tests do).
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import TracebackType

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
ENVIRONMENT_VARIABLE = "GROUPNET_BACKEND"

_choice: str | None = None  # None until the first op call reads the environment or use_backend sets it


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton can be imported (it is not installed on every platform)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def _check(backend: str, source: str) -> str:
    choice = backend.lower() if isinstance(backend, str) else backend
    if choice not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return choice


def get_backend() -> str:
    """The backend in force: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module docstring for precedence)."""
    global _choice
    if _choice is None:
        _choice = _check(os.environ.get(ENVIRONMENT_VARIABLE, "auto"), ENVIRONMENT_VARIABLE)
    return _choice


class use_backend:
    """Run the grouped ops on ``backend`` (``"torch"``, ``"triton"`` or ``"auto"``), over ``GROUPNET_BACKEND``.

    Called, it sets the backend for the rest of the process; used with ``with``, it restores the previous choice
    at the end of the block::

        groupnet.ops.use_backend("torch")          # from now on
        with groupnet.ops.use_backend("triton"):   # inside this block only
            y = model(x)

    The choice is process-wide (not per thread).
    """

    def __init__(self, backend: str) -> None:
        global _choice
        chosen = _check(backend, "use_backend: backend")
        self._previous = get_backend()
        _choice = chosen

    def __enter__(self) -> use_backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _choice
        _choice = self._previous


def backend_for(x: Tensor) -> str:
    """The implementation (``"torch"`` or ``"triton"``) a grouped op on ``x`` runs with."""
    choice = get_backend()
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("the Triton backend was chosen (use_backend or GROUPNET_BACKEND) but triton cannot be imported")
    return choice


def prefers_channels_last(device: torch.device | str) -> bool:
    """True when the grouped convs on ``device`` run the Triton kernels on CUDA, where NCHW activations and
    weights compile to scalar gathers and channels_last to contiguous (vectorised, asynchronous) channel loads.

    The trainer's ``channels_last`` default and the zoo models' input conversion follow it.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False
    choice = get_backend()
    return triton_available() if choice == "auto" else choice == "triton"
