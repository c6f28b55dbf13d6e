"""Peak memory of one training step: how far the resident set (RSS) rises above where it was before the step.

Run in a fresh process per (case, peer) so that nothing else's memory is counted: ``python benchmarks/memory.py
ARCH K BATCH PEER`` prints a JSON line. Two warm-up steps first create the gradients, the optimizer's momentum and
oneDNN's caches (memory that lives across steps); freed memory is handed back to the OS (``malloc_trim``) and the
kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), then one step is measured: the rise is what the step's
activations, gradients in flight and temporaries cost. Linux only.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import ModelCase, set_threads  # noqa: E402
from peers import make_runner  # noqa: E402


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def step_peak_rss_bytes(peer: str, case: ModelCase) -> int:
    step = make_runner(peer, case)
    step()
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak RSS, to the current RSS
    step()
    return (_status_kib("VmHWM") - before) * 1024


def main(argv: list[str]) -> None:
    arch, branches, batch, peer = argv[0], int(argv[1]), int(argv[2]), argv[3]
    set_threads()
    case = ModelCase(arch, branches, batch, "train")
    print(json.dumps({"case": case.id, "peer": peer, "peak_rss_delta_bytes": step_peak_rss_bytes(peer, case)}))


if __name__ == "__main__":
    main(sys.argv[1:])
