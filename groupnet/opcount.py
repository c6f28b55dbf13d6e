"""Count the torch operator calls of a function with the torch profiler (dispatch overhead, not time).

groupnet runs each layer for all K branches as one op, so the operator calls of a forward must not grow with K;
a per-branch loop makes K times as many. (The zoo models' ``auto`` execution order switches to branch after branch,
K times the calls, only at CPU batches large enough that dispatch no longer matters: :mod:`groupnet.branch_major`.)
``tests/test_op_count.py`` checks it and ``benchmarks/run.py`` reports it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class OperatorCalls:
    """``top_level``: aten ops called from Python (each one a trip through the dispatcher from the model code);
    ``total``: every aten op, nested ones included; ``by_name``: top-level calls per op name."""

    top_level: int
    total: int
    by_name: Counter


def _is_aten(event: Any) -> bool:
    return event.name.startswith("aten::")


def _nested_in_aten(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_aten(parent):
            return True
        parent = parent.cpu_parent
    return False


def operator_calls(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> OperatorCalls:
    """Run ``fn(*args, **kwargs)`` once under the torch profiler and count the aten operator calls it made."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    aten = [e for e in prof.events() if _is_aten(e)]
    top = [e for e in aten if not _nested_in_aten(e)]
    return OperatorCalls(top_level=len(top), total=len(aten), by_name=Counter(e.name for e in top))
