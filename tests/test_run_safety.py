"""No run may destroy or misdescribe another run's results: concurrent runs, diverged epochs, crashes at every
write, failed runs, leftovers of killed saves. Crashes are real processes ended with ``os._exit`` at the point
(tests/helpers/crash_runs.py); concurrent runs are real processes started together."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import pytest
import torch

from groupnet.train import main
from groupnet.training import checkpoint as ckpt_io
from groupnet.training.metrics import MetricsLog
from groupnet.training.trainer import Trainer
from helpers.crash_runs import rising_accuracy_evaluate, run, spawn
from helpers.train_runs import QUICK, load_ckpt, quick

FILES = ("last.pt", "best.pt", "config.json", "metrics.jsonl", "metrics.csv")


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")
    return json.loads(text, parse_constant=refuse)


def _rows(folder):
    return [_strict_json(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _snapshot(folder):
    return {n: (folder / n).read_bytes() for n in FILES if (folder / n).exists()}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("groupnet.train: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    assert main(quick(out, "--epochs", "1")) == 0
    return out


def _copy(run, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


# ----------------------------------------------------------------------------------------------- collisions


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    seeds = (1, 2, 3)
    procs = [spawn([*QUICK, "--epochs", "1", "--seed", str(s)], tmp_path, fixed_stamp="20260101-000000")
             for s in seeds]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [r[1][-2000:] for r in results]
    folders = sorted((tmp_path / "runs").iterdir())
    assert [f.name for f in folders] == ["digits-small_cnn-k2-20260101-000000", "digits-small_cnn-k2-20260101-000000-2",
                                         "digits-small_cnn-k2-20260101-000000-3"]
    assert sorted(load_ckpt(f / "last.pt")["recipe"]["seed"] for f in folders) == list(seeds)
    for f in folders:
        ckpt = load_ckpt(f / "last.pt")
        assert [r["epoch"] for r in _rows(f)] == [1]
        assert _strict_json((f / "config.json").read_text())["seed"] == ckpt["recipe"]["seed"]
        assert _rows(f)[0]["train_loss"] == ckpt["history"][0]["train_loss"]
    for (out, _err), f in zip(results, folders):
        assert any(str(g.relative_to(tmp_path)) in out for g in folders)


def test_a_second_run_on_a_folder_in_use_fails_and_leaves_the_first_alone(tmp_path):
    out, gate = tmp_path / "run", tmp_path / "gate"
    first = spawn(quick(out, "--epochs", "1", "--seed", "1"), tmp_path, hold_until=str(gate))
    try:
        for _ in range(2400):
            if (tmp_path / "gate.started").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "gate.started").exists(), first.communicate()[1][-2000:]
        second = run(quick(out, "--epochs", "1", "--seed", "2"), tmp_path)
        assert second.returncode == 2, second.stderr[-2000:]
        line = _one_line(second.stderr)
        assert "in use by another run" in line and str(out) in line and f"process {first.pid}" in line
    finally:
        gate.touch()
        _, err = first.communicate(timeout=400)
    assert first.returncode == 0, err[-2000:]
    assert load_ckpt(out / "last.pt")["recipe"]["seed"] == 1
    assert [r["epoch"] for r in _rows(out)] == [1]
    # the folder is free again, and now holds a run: a fresh run is refused, a resume is not
    again = run(quick(out, "--epochs", "1", "--seed", "2"), tmp_path)
    assert again.returncode == 2 and "already holds" in again.stderr


# ------------------------------------------------------------------------------------------------ divergence


DIVERGE = ["--lr", "1e38", "--lr-schedule", "constant", "--warmup-epochs", "0"]


def test_a_diverged_epoch_is_not_saved_over_a_good_run(good_run, tmp_path, capsys):
    # one step per epoch: the training loss is computed before the update that blows the weights up
    out = _copy(good_run, tmp_path)
    before = _snapshot(out)
    assert main(["--resume", str(out), "--no-progress", "--epochs", "2", "--train-subset", "32", *DIVERGE]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "diverged in epoch 2" in line and "not finite" in line and "still holds epoch 1" in line
    assert _snapshot(out) == before


def test_a_fresh_diverged_run_saves_nothing_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(quick(out, "--train-subset", "32", *DIVERGE)) == 2
    line = _one_line(capsys.readouterr().err)
    assert "diverged in epoch 1" in line and "no checkpoint was written" in line
    assert not out.exists()


def test_metric_files_stay_valid_json_with_non_finite_values(tmp_path):
    log = MetricsLog(tmp_path)
    log.append({"epoch": 1, "train_loss": float("nan"), "train_images_per_s": float("inf")})
    assert _rows(tmp_path) == [{"epoch": 1, "train_loss": None, "train_images_per_s": None}]
    assert "nan" not in (tmp_path / "metrics.csv").read_text().lower()


# ------------------------------------------------------------------------------------------------ crash windows


def _assert_consistent_pair(out):
    last = load_ckpt(out / "last.pt")
    best = load_ckpt(out / "best.pt")
    accs = [r["test_acc_ensemble"] for r in last["history"]]
    best_epoch = last["history"][accs.index(max(accs))]["epoch"]
    assert best["epoch"] == best_epoch, (best["epoch"], best_epoch)
    assert last["best_acc"] == best["history"][-1]["test_acc_ensemble"] == max(accs)


@pytest.mark.parametrize("crash_after", [1, 2, 3])
def test_a_crash_after_any_checkpoint_write_leaves_a_consistent_pair(tmp_path, monkeypatch, crash_after):
    # every epoch is the best so far: 2 epochs write last.pt and best.pt twice
    out = tmp_path / "run"
    crashed = run(quick(out), tmp_path, die_after_save=crash_after, rising_accuracy=True)
    assert crashed.returncode == 9, crashed.stderr[-2000:]
    assert (out / "last.pt").exists()
    monkeypatch.setattr(Trainer, "evaluate", rising_accuracy_evaluate(Trainer.evaluate))
    assert main(["--resume", str(out), "--no-progress"]) == 0
    _assert_consistent_pair(out)
    last = load_ckpt(out / "last.pt")
    assert last["epoch"] == 2
    assert [r["epoch"] for r in _rows(out)] == [1, 2]
    assert _strict_json((out / "config.json").read_text()) == last["recipe"]


def test_a_kill_during_a_save_leaves_no_temporary_file_after_the_next_run(tmp_path):
    out = tmp_path / "run"
    crashed = run(quick(out), tmp_path, die_in_save=3)  # epoch 2's last.pt, half written
    assert crashed.returncode == 9, crashed.stderr[-2000:]
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and all(n.startswith(".last.pt.") for n in leftovers)
    assert load_ckpt(out / "last.pt")["epoch"] == 1
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert load_ckpt(out / "last.pt")["epoch"] == 2


# ------------------------------------------------------------------------------------------------ failed runs


def test_a_failed_resume_does_not_rewrite_the_record_of_the_run(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    before = _snapshot(out)
    assert main(["--resume", str(out), "--no-progress", "--epochs", "2", "--lr", "1e6"]) == 2
    assert "try a lower --lr" in capsys.readouterr().err  # the loss or the weights became NaN
    assert _snapshot(out) == before
    assert _strict_json((out / "config.json").read_text())["lr"] == load_ckpt(out / "last.pt")["recipe"]["lr"]


def test_a_failed_overwrite_leaves_the_old_run_whole(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    before = _snapshot(out)
    assert main(quick(out, "--overwrite", "--train-subset", "32", *DIVERGE)) == 2
    assert "diverged" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_failed_fresh_run_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*QUICK, "--train-subset", "32", *DIVERGE]) == 2
    capsys.readouterr()
    assert not (tmp_path / "runs").exists()
    nested = tmp_path / "a" / "b"
    assert main(quick(nested, "--train-subset", "32", *DIVERGE)) == 2
    assert not (tmp_path / "a").exists()


def test_a_resume_rewrites_records_a_crash_left_behind(tmp_path, monkeypatch):
    out = tmp_path / "run"
    # ends after epoch 2's last.pt (epoch 1: last, best; epoch 2: best, last), before its config and metrics
    crashed = run(quick(out), tmp_path, die_after_save=4, rising_accuracy=True)
    assert crashed.returncode == 9
    assert len(_rows(out)) == 1 and load_ckpt(out / "last.pt")["epoch"] == 2
    monkeypatch.setattr(Trainer, "evaluate", rising_accuracy_evaluate(Trainer.evaluate))
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert [r["epoch"] for r in _rows(out)] == [1, 2]


# ------------------------------------------------------------------------------------------------ files


def test_run_files_replace_symlinks_instead_of_writing_through_them(tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    victim.write_text("keep me")
    out.mkdir()
    for name in ("metrics.jsonl", "metrics.csv", "config.json", "summary.json"):
        (out / name).symlink_to(victim)
    assert main(quick(out, "--epochs", "1")) == 0
    assert victim.read_text() == "keep me"
    assert not any((out / n).is_symlink() for n in ("metrics.jsonl", "metrics.csv", "config.json", "summary.json"))


def test_run_files_share_one_mode(tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(quick(out, "--epochs", "1")) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def test_checkpoint_fields_round_trip_through_validation(good_run):
    ckpt = ckpt_io.load(good_run, training_state=True)
    assert ckpt["best_epoch"] == 1 and isinstance(ckpt["model"], dict)
    ckpt["hooks"] = {"sparse": {"masks": {"w": torch.ones(2)}}}
    ckpt_io.check_structure(ckpt, "x")


# ------------------------------------------------------------------------------------------------ messages


def _interrupt_at_step(monkeypatch, step):
    from groupnet.cotraining import CoTrainingLoss

    calls = {"n": 0}
    forward = CoTrainingLoss.forward

    def dying_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CoTrainingLoss, "forward", dying_forward)


def test_ctrl_c_names_the_folder_and_what_it_holds(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_at_step(monkeypatch, 6 + 2)  # 6 steps per epoch: in epoch 2
    assert main(quick(out)) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"groupnet.train: interrupted; {out}/last.pt holds epoch 1 (continue with --resume {out})"


def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_at_step(monkeypatch, 2)
    assert main(quick(out)) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"groupnet.train: interrupted before the first epoch completed; nothing was saved in {out}"
    assert not out.exists()


def test_resuming_from_best_pt_warns_that_last_pt_will_be_replaced(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    assert main(["--resume", str(out), "--no-progress", "--epochs", "2"]) == 0
    capsys.readouterr()
    shutil.copy(out / "last.pt", out / "older.pt")
    assert main(["--resume", str(out / "older.pt"), "--no-progress", "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert f"warning: resuming from {out / 'older.pt'} (epoch 2): {out / 'last.pt'} will be replaced" in err


def test_grouped_batch_norm_checks_the_input_dtype():
    from groupnet.modules import GroupedBatchNorm2d

    bn = GroupedBatchNorm2d(3, branches=2)
    with pytest.raises(TypeError, match=r"GroupedBatchNorm2d: input dtype torch.float64 does not match the "
                                        r"parameters' dtype torch.float32"):
        bn(torch.randn(2, 6, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="GroupedBatchNorm2d: expects a floating-point input, got torch.int64"):
        bn(torch.ones(2, 6, 4, 4, dtype=torch.int64))
    assert bn(torch.randn(2, 6, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16  # autocast's mixed precision


@pytest.mark.parametrize("targets", [[[1.5, -0.5, 0.0]], [[0.5, 0.5, 0.5]], [[0.2, 0.2, 0.2]]])
def test_soft_targets_must_be_probabilities(targets):
    from groupnet.cotraining import CoTrainingLoss

    loss = CoTrainingLoss(2)
    t = torch.tensor(targets * 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="soft targets must be probabilities"):
        loss(torch.randn(4, 6, dtype=torch.float64), t)
    assert torch.isfinite(loss(torch.randn(4, 6, dtype=torch.float64), torch.full((4, 3), 1 / 3,
                                                                                   dtype=torch.float64)).loss)


def test_process_group_timeout_defaults_by_device_and_follows_the_option(monkeypatch):
    from datetime import timedelta

    import torch.distributed as dist

    from groupnet.training import distributed
    from groupnet.training.distributed import DistContext

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.append((backend, kw["timeout"])))
    ctx = DistContext(rank=0, world_size=2)
    distributed.init_process_group(ctx, torch.device("cpu"))
    distributed.init_process_group(ctx, torch.device("cpu"), 7.5)
    assert seen == [("gloo", timedelta(seconds=180)), ("gloo", timedelta(seconds=7.5))]


def test_all_processes_of_a_ddp_run_stop_on_a_folder_in_use(tmp_path):
    import subprocess
    import sys

    from groupnet.training.run_folder import RunFolder

    out = tmp_path / "run"
    held = RunFolder.open(out)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "groupnet.train", *quick(out, "--epochs", "1", "--dist-timeout", "60")],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    finally:
        held.release()
    assert proc.returncode != 0
    assert proc.stderr.count(f"run folder {out} is in use by another run (process {os.getpid()})") == 2, \
        proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
