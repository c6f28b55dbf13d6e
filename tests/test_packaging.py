"""pyproject lists every package explicitly (``kernels/`` installs as ``groupnet.kernels``): a package missing from
the list would import in an editable install and be absent from a built wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set()
    for package, folder in config["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            parts = init.parent.relative_to(base).parts
            on_disk.add(".".join([package, *parts]))
    assert on_disk - listed == set(), f"packages missing from pyproject's [tool.setuptools] packages: {on_disk - listed}"
    assert listed - on_disk == set(), f"listed packages without an __init__.py: {listed - on_disk}"
