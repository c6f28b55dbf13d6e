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


def test_wheel_installs_and_runs_without_triton_or_the_train_extra(tmp_path):
    """Build the wheel, install it with ``pip --no-deps`` into a fresh venv that sees torch and numpy (and their
    dependencies) but neither triton nor the trainer's extras, and use it there: the layers run on torch's path,
    ``python -m groupnet.kernels.report`` says in one line that triton is missing, and the metadata, license,
    ``py.typed`` and console scripts are in place."""
    import shutil
    import subprocess
    import sys
    import sysconfig
    import textwrap

    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".hypothesis",
                                  ".pytest_cache", ".benchmarks")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=skip)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
                   check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("groupnet-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)

    # torch, numpy and their dependencies from this environment, through symlinks: no triton, no trainer extras,
    # no groupnet (editable or installed)
    here = Path(sysconfig.get_paths()["purelib"])
    hidden = ("triton", "groupnet", "__editable__", "tqdm", "matplotlib", "sklearn", "scikit_learn", "yaml", "_yaml",
              "pyyaml", "PyYAML")
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in here.iterdir():
        if not entry.name.lower().startswith(tuple(h.lower() for h in hidden)) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "deps-of-the-test.pth").write_text(f"{deps}\n")

    check = textwrap.dedent(f"""
        import importlib.metadata as md, importlib.resources, importlib.util, sys
        import torch
        import groupnet as gn
        assert gn.__file__.startswith({str(venv)!r}), gn.__file__
        assert importlib.util.find_spec("triton") is None
        assert not gn.ops.triton_available()
        model = gn.build_model("small_cnn", branches=2, num_classes=10, in_channels=1)
        assert model(torch.randn(2, 2, 8, 8)).shape == (2, 20)
        loaded = {{"tqdm", "matplotlib", "sklearn", "yaml", "kornia"}} & set(sys.modules)
        assert not loaded, loaded
        assert importlib.resources.files("groupnet").joinpath("py.typed").is_file()
        meta = md.metadata("groupnet")
        assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
        assert "LICENSE" in meta.get_all("License-File")
        files = [str(f) for f in md.files("groupnet")]
        assert any(f.endswith("LICENSE") for f in files), files
        requires = md.requires("groupnet")
        core = sorted(r for r in requires if "extra ==" not in r)
        assert [r.split(">")[0].split(";")[0].strip() for r in core] == ["numpy", "torch"], core
        train = sorted(r.split(";")[0].strip() for r in requires if 'extra == "train"' in r)
        assert train == ["kornia>=0.8", "matplotlib", "pyyaml", "scikit-learn", "tqdm"], train
        assert not any(r.startswith("triton") for r in requires), requires
        urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
        assert {{"Homepage", "Documentation", "Source", "Issues"}} <= set(urls), urls
        assert all(u.startswith("https://github.com/groupnet/groupnet") for u in urls.values()), urls
        assert "Typing :: Typed" in meta.get_all("Classifier")
        scripts = {{e.name for e in md.entry_points(group="console_scripts") if e.dist.name == "groupnet"}}
        assert scripts == {{"groupnet-train", "groupnet-eval", "groupnet-scaling", "groupnet-roofline",
                           "groupnet-kernels-report"}}, scripts
        print("ok")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    for script in ("groupnet-train", "groupnet-eval", "groupnet-kernels-report"):
        assert (venv / "bin" / script).is_file(), script
    helped = subprocess.run([str(venv / "bin" / "groupnet-train"), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=env)  # the parser needs neither the train extra nor torch
    assert helped.returncode == 0 and "--model" in helped.stdout, helped.stderr

    report = subprocess.run([str(python), "-m", "groupnet.kernels.report"], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert report.returncode == 2
    assert report.stdout == "" and report.stderr.count("\n") == 1 and "needs triton" in report.stderr, report.stderr
