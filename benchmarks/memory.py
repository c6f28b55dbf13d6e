"""Peak memory of one training step: how far the resident set (RSS) rises above where it was before the step.

Run in a fresh process per (case, peer) so that nothing else's memory is counted: ``python benchmarks/memory.py
ARCH K BATCH PEER`` prints a JSON line. Two warm-up steps first create the gradients, the optimizer's momentum and
oneDNN's caches (memory that lives across steps); freed memory is handed back to the OS (``malloc_trim``) and the
kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), then one step is measured: the rise is what the step's
activations, gradients in flight and temporaries cost. Linux only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import ModelCase, set_threads  # noqa: E402
from peak_rss import peak_rss_rise_bytes, reset_peak_rss  # noqa: E402
from peers import make_runner  # noqa: E402


def step_peak_rss_bytes(peer: str, case: ModelCase) -> int:
    step = make_runner(peer, case)
    step()
    step()
    before = reset_peak_rss()
    step()
    return peak_rss_rise_bytes(before)


def main(argv: list[str]) -> None:
    arch, branches, batch, peer = argv[0], int(argv[1]), int(argv[2]), argv[3]
    set_threads()
    case = ModelCase(arch, branches, batch, "train")
    print(json.dumps({"case": case.id, "peer": peer, "peak_rss_delta_bytes": step_peak_rss_bytes(peer, case)}))


if __name__ == "__main__":
    main(sys.argv[1:])
