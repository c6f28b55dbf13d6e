"""Shared helpers of the trainer tests: a small, fast run of ``python -m groupnet.train`` on digits."""

from __future__ import annotations

from pathlib import Path

import torch

# 192 digits images, global batch 32: 6 steps per epoch, about a second per epoch on a loaded 2-core machine.
QUICK = ["--train-subset", "192", "--batch-size", "32", "--epochs", "2", "--workers", "0", "--no-progress",
         "--no-baseline", "--warmup-epochs", "0.5", "--cot-warmup-epochs", "1"]


def quick(out: Path, *extra: str) -> list[str]:
    return [*QUICK, "--output-dir", str(out), *extra]


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_tensors_equal(a, b, path: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are exactly equal (torch.equal for tensors)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"tensors differ at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}: {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_tensors_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {path}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
