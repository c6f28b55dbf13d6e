"""Bad input to the trainer and the evaluator: one clear line on stderr, exit status 2, no traceback, nothing
written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from groupnet.eval import main as eval_main
from groupnet.train import main


# name: (arguments given the test's tmp folder, the text the error line must hold)
CASES = {
    "K < 1": (lambda t: ["--branches", "0"], "--branches (K) must be >= 1, got 0"),
    "unknown model": (lambda t: ["--model", "resnet-fancy"], "unknown arch 'resnet-fancy'"),
    "missing cifar folder": (lambda t: ["--dataset", "cifar10", "--data-dir", str(t / "nowhere")],
                             "Put the folder cifar-10-batches-py/"),
    "cifar without data dir": (lambda t: ["--dataset", "cifar100"], "cifar100 needs --data-dir"),
    "empty image folder": (lambda t: ["--dataset", "folder", "--data-dir", str(t / "empty")],
                           "one sub-folder per class"),
    "no epochs": (lambda t: ["--epochs", "0"], "--epochs must be >= 1"),
    "negative lr": (lambda t: ["--lr", "-0.1"], "--lr must be a finite number >= 0"),
    "amp on cpu": (lambda t: ["--amp", "--device", "cpu"], "--amp needs a CUDA device"),
    "bad device": (lambda t: ["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    "missing config": (lambda t: ["--config", str(t / "none.yaml")], "does not exist"),
    "unparsable config": (lambda t: ["--config", str(t / "bad.yaml")], "cannot parse config file"),
    "evaluate without checkpoint": (lambda t: ["--evaluate"], "--evaluate needs --resume"),
    "missing checkpoint": (lambda t: ["--resume", str(t / "empty")], "does not exist"),
    "batch too large": (lambda t: ["--train-subset", "10", "--batch-size", "64"], "larger than the 10 training images"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2\n")
    make_argv, message = CASES[case]
    argv = make_argv(tmp_path)
    out = tmp_path / "out"
    assert main([*argv, "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("groupnet.train: error: "), err
    assert message in err
    assert not out.exists() and not (tmp_path / "runs").exists()  # nothing written


def test_global_batch_must_split_across_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["--batch-size", "33", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 33 is the global batch: it must be divisible by the 2 processes" in err
    assert not (tmp_path / "out").exists()


def test_argparse_rejects_malformed_values():
    with pytest.raises(SystemExit) as e:
        main(["--branches", "two"])
    assert e.value.code == 2


def test_real_processes_print_no_traceback(tmp_path):
    for module, args, message in (
        ("groupnet.train", ["--branches", "0"], "--branches (K) must be >= 1"),
        ("groupnet.eval", [str(tmp_path / "missing.pt")], "does not exist"),
    ):
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and message in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"{module}: error: ")
        assert proc.stdout == ""


def test_eval_refuses_an_options_file_as_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("these are not weights")
    assert eval_main([str(tmp_path / "notes.pt")]) == 2
    assert "truncated or not a torch checkpoint" in capsys.readouterr().err


def test_a_model_that_k_cannot_divide_names_the_k_values_that_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", "resnext29-8x64d", "-K", "3", "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot be divided into --branches 3" in err and "K values that work: 1, 2, 4, 8" in err
    assert "rule=" not in err and not out.exists()


@pytest.mark.parametrize("option", ["--padding", "--cutout"])
def test_augmentation_as_large_as_the_image_is_refused(tmp_path, capsys, option):
    out = tmp_path / "out"
    assert main([option, "8", "--output-dir", str(out), "--no-progress"]) == 2  # digits images are 8x8
    err = capsys.readouterr().err
    assert f"{option} 8 is not smaller than the 8x8 images of digits" in err and not out.exists()


def test_yaml_numbers_without_a_dot_are_read_as_numbers(tmp_path):
    from groupnet.training.config import load_config_file

    (tmp_path / "c.yaml").write_text("lr: 1e-2\nweight_decay: 5e-4\nepochs: 3\n")
    assert load_config_file(tmp_path / "c.yaml") == {"lr": 0.01, "weight_decay": 0.0005, "epochs": 3}
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(Exception, match="option 'lr' must be float or int, got 'fast'"):
        load_config_file(tmp_path / "bad.yaml")


@pytest.mark.parametrize("argv, message", [(["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                                           (["--workers", "-1"], "--workers must be >= 0, got -1")])
def test_eval_names_its_own_options(tmp_path, capsys, argv, message):
    assert eval_main([str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"groupnet.eval: error: {message}"


def test_dist_timeout_must_be_positive(tmp_path, capsys):
    assert main(["--dist-timeout", "0", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--dist-timeout must be a number of seconds > 0" in capsys.readouterr().err
