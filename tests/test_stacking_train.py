"""``--model pkg.module:Class``: a user's own plain model, built K times with seeds ``seed + k`` and stacked."""

import json

import pytest
import torch
from torch import nn

import groupnet as gn
from archs import DenseNet
from groupnet.models import build_model
from groupnet.models.imported import constructor_kwargs, load_class
from groupnet.train import main
from groupnet.training.config import TrainRecipe
from groupnet.training.errors import ConfigError
from groupnet.training.trainer import Trainer
from helpers.train_runs import load_ckpt, quick


def test_import_path_builds_k_seeded_models_and_stacks_them():
    model = build_model("archs:DenseNet", branches=3, num_classes=4, in_channels=1, image_size=8)
    base = torch.initial_seed()
    for k in range(3):
        torch.manual_seed(base + k)
        plain = DenseNet(num_classes=4, in_channels=1)
        back = gn.extract_branch(model, k)
        assert type(back) is DenseNet
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), plain.state_dict().values()))
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 12)


def test_constructor_gets_the_keywords_it_takes():
    class OnlyClasses(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()

    class Anything(nn.Module):
        def __init__(self, **kwargs) -> None:
            super().__init__()

    assert constructor_kwargs(OnlyClasses, 7, 3) == {"num_classes": 7}
    assert constructor_kwargs(Anything, 7, 3) == {"num_classes": 7, "in_channels": 3}
    assert constructor_kwargs(DenseNet, 7, 3) == {"num_classes": 7, "in_channels": 3}


@pytest.mark.parametrize("path, match", [
    ("archs:Nope", "has no attribute 'Nope'"),
    ("no_such_module_here:Net", "cannot import module"),
    ("archs:conv_bn", "not an nn.Module subclass"),
    ("archs:", "pkg.module:Class"),
])
def test_bad_import_paths_are_named(path, match):
    with pytest.raises(ValueError, match=match):
        load_class(path)
    with pytest.raises(ConfigError, match="--model"):
        Trainer(TrainRecipe(model=path, dataset="digits"))


def test_trainer_trains_an_imported_model(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--model", "archs:MLP", "--branches", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["test_acc"]) == 2
    ckpt = load_ckpt(out / "last.pt")
    model = build_model("archs:MLP", branches=2, num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict(ckpt["model"])
    assert type(gn.extract_branch(model, 1)).__name__ == "MLP"
