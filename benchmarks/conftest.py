"""pytest setup of the benchmarks: collect ``bench_*.py``, fix the thread count, record the environment.

Run them through ``python benchmarks/run.py`` (it writes RESULTS.md); ``pytest benchmarks/bench_ops.py`` runs one
file. These are not tests of correctness (tests/ has those) and CI does not run them.
"""

from __future__ import annotations

import os

import pytest
import torch

from cases import glibc_default, set_threads
from groupnet.cpu_memory import retain_freed_memory


def pytest_collect_file(file_path, parent):
    # bench_*.py are collected when the folder is given (``pytest benchmarks``); a file named on the command line
    # is collected by pytest itself, so it must not be collected twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    set_threads()
    if not glibc_default():
        # As groupnet.train does on CPU, for every peer alike (process-wide): see groupnet/cpu_memory.py.
        retain_freed_memory()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["mkldnn"] = torch.backends.mkldnn.is_available()
    machine_info["groupnet_env"] = {k: v for k, v in os.environ.items() if k.startswith("GROUPNET_")}
    machine_info["glibc_freed_memory_retained"] = not glibc_default()
    try:
        machine_info["load_average_at_start"] = os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        pass


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Every benchmark starts with an empty dynamo cache: compiled peers must not hit a recompile limit."""
    torch._dynamo.reset()
    yield
