"""``--help`` of every command line (``python -m groupnet.X`` and the console scripts) imports neither torch nor the
training stack, and the names it offers are those of the registries.

The parser's names come from :mod:`groupnet.training.choices` (literal tuples, so that building the parser needs no
torch); the tests below check each tuple against the registry it mirrors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from groupnet.training import choices

ROOT = Path(__file__).resolve().parent.parent
CLI_MODULES = ("groupnet.train", "groupnet.eval", "groupnet.scaling", "groupnet.roofline", "groupnet.experiments",
               "groupnet.kernels.report")

# Runs one entry point with --help in a fresh interpreter and prints what it imported.
PROBE = """
import json, sys
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target, "--help"]
code = 0
try:
    if kind == "module":
        import runpy
        runpy.run_module(target, run_name="__main__")
    else:
        import importlib
        module, _, func = target.partition(":")
        getattr(importlib.import_module(module), func)(["--help"])
except SystemExit as e:
    code = e.code or 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "triton", "matplotlib", "sklearn"))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def probe(kind: str, target: str) -> tuple[str, dict]:
    env = {**os.environ, "COLUMNS": "1000"}  # one line per option: the model list is not wrapped
    out = subprocess.run([sys.executable, "-c", PROBE, kind, target], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout, json.loads(out.stderr.strip().splitlines()[-1])


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("module", CLI_MODULES)
def test_module_help_imports_no_torch(module):
    text, seen = probe("module", module)
    assert seen == {"code": 0, "heavy": []}
    assert text.startswith("usage:")


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_console_script_help_imports_no_torch(script):
    target = console_scripts()[script]
    assert target.split(":")[0] in CLI_MODULES  # every console script is one of the command lines above
    text, seen = probe("script", target)
    assert seen == {"code": 0, "heavy": []}
    assert text.startswith("usage:")


def test_train_help_lists_the_registry_models():
    from groupnet.models.registry import model_descriptions

    text, _ = probe("module", "groupnet.train")
    listed = re.search(r"architecture: (.*?), or pkg\.module:Class", text)
    assert listed is not None, text
    assert listed.group(1).split(", ") == list(model_descriptions())


def test_choices_mirror_their_registries():
    from groupnet import _checks, branch_major, sparse
    from groupnet.data import augment
    from groupnet.data import registry as data_registry
    from groupnet.models.registry import model_descriptions

    assert choices.MODEL_NAMES == tuple(model_descriptions()), "add the model to groupnet/training/choices.py"
    assert choices.DATASETS == data_registry.DATASETS
    assert choices.DIVERGENCES == _checks.DIVERGENCES
    assert choices.EXECUTION_ORDERS == branch_major.EXECUTION_ORDERS
    assert choices.SPARSE_INITS == sparse.SPARSE_INITS
    assert choices.DST_METHODS == sparse.DST_METHODS
    assert choices.DROP_SCHEDULES == sparse.DROP_SCHEDULES
    assert choices.RECIPES == augment.RECIPES
    assert choices.RECIPE_MIXUP == augment.RECIPE_MIXUP


def test_lazy_facade_resolves_every_public_name():
    code = """
import sys
import groupnet as gn
assert "torch" not in sys.modules
import groupnet.complexity  # the submodule of the same name must not replace the function
assert callable(gn.complexity) and gn.complexity is sys.modules["groupnet.complexity"].complexity
for name in gn.__all__:
    assert getattr(gn, name) is not None, name
assert set(gn.__all__) <= set(dir(gn))
import groupnet.training as tr
for name in tr.__all__:
    assert getattr(tr, name) is not None, name
from groupnet.modules import GroupedConv2d
assert gn.GroupedConv2d is GroupedConv2d
try:
    gn.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("no AttributeError")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
