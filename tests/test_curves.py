"""curves.png: which panels a run gets, one colour per branch across panels, the learning rate on its own axis, the
accuracy axis zoomed to the data, and the K=1 baseline overlaid (checked on the matplotlib figure, not on pixels)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_rgba

from groupnet.training.metrics import BASELINE_COLOUR, curves_figure, plot_curves


def rows(branches: int, epochs: int = 10) -> list[dict]:
    out = []
    for e in range(1, epochs + 1):
        acc = 100 - 60 / e
        row = {"epoch": e, "lr": 0.05 * (1 - e / (epochs + 1)), "cot_weight": min(0.5, 0.1 * e),
               "train_divergence": 0.01 / e, "train_acc_ensemble": acc + 1, "test_acc_ensemble": acc + 0.5,
               "test_ce_ensemble": 1 / e}
        for i in range(branches):
            row |= {f"train_ce_{i}": 2 / e + 0.01 * i, f"test_ce_{i}": 2 / e + 0.02 * i, f"train_acc_{i}": acc - i,
                    f"test_acc_{i}": acc - 0.5 * i}
        out.append(row)
    return out


def panels(fig) -> dict[str, object]:
    """Title -> axes (twin axes have no title)."""
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


@pytest.fixture
def figure():
    made = []

    def make(*args, **kwargs):
        fig = curves_figure(*args, **kwargs)
        made.append(fig)
        return fig

    yield make
    for fig in made:
        plt.close(fig)


def test_k_branches_get_the_co_training_panel_and_a_learning_rate_panel_of_their_own(figure):
    fig = figure(rows(3), "t")
    p = panels(fig)
    assert set(p) == {"loss (train solid, test dashed)", "accuracy (y zoomed to the second half)", "co-training",
                      "learning rate"}
    assert list(lines(p["learning rate"])) == ["learning rate"]  # nothing else shares the lr axis
    lr = lines(p["learning rate"])["learning rate"]
    assert max(lr.get_ydata()) == pytest.approx(0.05 * 10 / 11)
    assert p["learning rate"].get_ylim()[1] < 0.1  # scaled to the learning rate, not to the co-training weight
    assert "train divergence" in lines(p["co-training"])
    twins = [ax for ax in fig.axes if not ax.get_title()]
    assert len(twins) == 1 and list(lines(twins[0])) == ["weight (right axis)"]


def test_each_branch_has_one_colour_in_every_panel(figure):
    p = panels(figure(rows(3)))
    loss, acc = lines(p["loss (train solid, test dashed)"]), lines(p["accuracy (y zoomed to the second half)"])
    for i in range(3):
        colours = {to_rgba(loss[f"branch {i} train"].get_color()), to_rgba(loss[f"branch {i} test"].get_color()),
                   to_rgba(acc[f"branch {i} test"].get_color())}
        assert len(colours) == 1, i
    assert len({to_rgba(acc[f"branch {i} test"].get_color()) for i in range(3)}) == 3


def test_one_branch_has_no_co_training_panel_and_the_baseline_is_overlaid_when_given(figure):
    assert "co-training" not in panels(figure(rows(1)))
    without = panels(figure(rows(2)))
    assert "K=1 baseline test" not in lines(without["accuracy (y zoomed to the second half)"])
    p = panels(figure(rows(2), baseline=rows(1)))
    for title in ("accuracy (y zoomed to the second half)", "loss (train solid, test dashed)"):
        base = lines(p[title])["K=1 baseline test"]
        assert to_rgba(base.get_color()) == to_rgba(BASELINE_COLOUR)
        assert list(base.get_xdata()) == list(range(1, 11))


def test_accuracy_axis_is_zoomed_to_the_second_half_of_training(figure):
    data = rows(2)
    acc = panels(figure(data))["accuracy (y zoomed to the second half)"]
    low, high = acc.get_ylim()
    late = [r[k] for r in data[5:] for k in ("test_acc_0", "test_acc_1", "test_acc_ensemble", "train_acc_ensemble")]
    assert low <= min(late) and max(late) <= high <= 100.2
    assert low > data[0]["test_acc_0"]  # the first epochs' low accuracy does not squash the axis


def test_plot_curves_writes_a_png_and_tolerates_missing_values(tmp_path):
    data = rows(2)
    data[3]["test_acc_1"] = math.nan
    del data[4]["lr"]
    plot_curves(data, tmp_path / "curves.png", "t", baseline=rows(1))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_curves([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_the_trainer_redraws_the_curves_with_the_baseline_after_it_ran(tmp_path, monkeypatch):
    from groupnet.train import main
    from groupnet.training import trainer as trainer_module

    calls = []

    def spy(rows, path, title="", baseline=None):
        calls.append((len(rows), path, title, None if baseline is None else len(baseline)))
        plot_curves(rows, path, title, baseline)

    monkeypatch.setattr(trainer_module, "plot_curves", spy)
    out = tmp_path / "run"
    assert main(["--epochs", "1", "--train-subset", "128", "--output-dir", str(out), "--no-progress"]) == 0
    assert calls[-1] == (1, out / "curves.png", "small_cnn K=2 on digits", 1)  # the K=2 run's, baseline overlaid
    assert (1, out / "baseline-k1" / "curves.png", "small_cnn K=1 on digits", None) in calls
