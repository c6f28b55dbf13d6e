"""Batched K-view augmentation (kornia) and the named recipes: each branch's view draws its own parameters in one
batch op, the views are a pure function of the caller's generator, shapes/dtypes/devices are kept, and the recipe is
recorded in the run's config and restored on resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.data import RECIPES, Augment, recipe_augment
from groupnet.data.augment import check_recipe
from groupnet.train import main
from groupnet.training.config import TrainRecipe, make_config, parse_options
from groupnet.training.errors import ConfigError
from groupnet.training.trainer import config_for_run
from helpers.train_runs import load_ckpt, quick

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SPLITNET = recipe_augment("splitnet-cifar", "cifar10", padding=4, flip=True)
BASIC = recipe_augment("basic", "cifar10", padding=4, flip=True)


def _images(n=16, c=3, s=32, seed=0):
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def _stats(c):
    return (0.5,) * c, (0.25,) * c


def _views(aug, x, k, seed):
    return aug.views(x, k, *_stats(x.shape[1]), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("aug", [BASIC, SPLITNET], ids=["basic", "splitnet-cifar"])
def test_each_branch_gets_its_own_view_of_each_image(aug):
    x = _images(n=16)
    out = _views(aug, x, 4, seed=3)
    per_branch = out.view(16, 4, 3, 32, 32)
    for i in range(4):
        for j in range(i + 1, 4):
            same = [torch.equal(per_branch[n, i], per_branch[n, j]) for n in range(16)]
            assert sum(same) <= 2, (i, j, same)  # 81 crops x 2 flips (and more): a repeat is rare


@pytest.mark.parametrize("aug", [BASIC, SPLITNET], ids=["basic", "splitnet-cifar"])
def test_views_are_a_function_of_the_generator_only(aug):
    x = _images(n=8)
    torch.manual_seed(1)
    a = _views(aug, x, 2, seed=5)
    state = torch.get_rng_state()
    torch.manual_seed(2)  # another global RNG state: the same views
    b = _views(aug, x, 2, seed=5)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    _views(aug, x, 2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    assert not torch.equal(a, _views(aug, x, 2, seed=6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
def test_views_keep_shape_dtype_and_device(device, dtype, k):
    x = _images(n=5, c=3, s=12).to(device, dtype)
    out = _views(SPLITNET, x, k, seed=0)
    assert out.shape == (5, 3 * k, 12, 12) and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), pad=st.integers(0, 4), seed=st.integers(0, 2**31))
def test_a_cropped_view_is_a_window_of_the_padded_image(h, w, pad, seed):
    img = torch.rand(1, 2, h, w, generator=torch.Generator().manual_seed(seed % 1000))
    out = Augment(padding=pad).views(img, 3, (0.0, 0.0), (1.0, 1.0), torch.Generator().manual_seed(seed))
    padded = F.pad(img[0], (pad,) * 4)
    windows = [padded[:, i : i + h, j : j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    for v in out[0].view(3, 2, h, w):
        assert any(torch.allclose(v, win, atol=1e-6) for win in windows)


def test_flip_and_crop_draw_every_outcome_in_one_batch():
    img = torch.arange(12.0).view(1, 1, 3, 4) / 12
    out = Augment(padding=1, flip=True).views(img, 400, (0.0,), (1.0,), torch.Generator().manual_seed(0))
    outcomes = {tuple(v.flatten().tolist()) for v in out[0]}
    assert len(outcomes) == 18  # 9 shifts x (flipped or not)


def test_random_erasing_fills_a_near_square_with_the_mean():
    x = torch.full((64, 1, 32, 32), 0.9)
    aug = Augment(erasing=1.0, erasing_scale=(0.125, 0.2), erasing_ratio=(0.99, 1.0))
    out = aug.views(x, 1, (0.1,), (0.2,), torch.Generator().manual_seed(0))
    erased = (out == 0).float().mean((1, 2, 3))
    assert torch.allclose(out[out != 0], torch.tensor(4.0))  # (0.9 - 0.1) / 0.2 elsewhere
    assert (erased > 0.10).all() and (erased < 0.23).all(), erased


@pytest.mark.parametrize("channels", [1, 3])
def test_autoaugment_per_image_on_one_and_three_channels(channels):
    x = _images(n=32, c=channels, s=8)
    aug = Augment(autoaugment="cifar10")
    out = aug.views(x, 2, (0.0,) * channels, (1.0,) * channels, torch.Generator().manual_seed(0))
    assert out.shape == (32, 2 * channels, 8, 8)
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6  # the policy's ops keep images in [0, 1]
    changed = (out.view(32, 2, channels, 8, 8) != x.unsqueeze(1)).flatten(2).any(-1)
    assert 0 < changed.float().mean() < 1  # some views changed, some not (each op fires with its probability)


def test_recipes_by_name():
    assert RECIPES == ("basic", "splitnet-cifar")
    assert recipe_augment("basic", "digits", padding=1, flip=False) == Augment(padding=1)
    cifar100 = recipe_augment("splitnet-cifar", "cifar100", padding=4, flip=True)
    assert (cifar100.autoaugment, cifar100.erasing, cifar100.erasing_scale) == ("cifar10", 0.5, (0.0625, 0.1))
    assert SPLITNET.erasing_scale == (0.125, 0.2) and SPLITNET.erasing_ratio == (0.99, 1.0)
    digits = recipe_augment("splitnet-cifar", "digits", padding=1, flip=False)
    assert not digits.flip and digits.padding == 1  # the data set's crop, no flip of digits
    with pytest.raises(ValueError, match="unknown augmentation recipe 'fancy'; choose one of basic, splitnet-cifar"):
        check_recipe("fancy")


# ------------------------------------------------------------------------------------------- config and runs


def test_recipe_brings_its_mixup_unless_given():
    cfg, _ = make_config(TrainRecipe().to_dict(), {"recipe": "splitnet-cifar"})
    assert (cfg.recipe, cfg.mixup_alpha) == ("splitnet-cifar", 0.2)
    cfg, _ = make_config(TrainRecipe().to_dict(), {"recipe": "splitnet-cifar"}, {"mixup_alpha": 0.0})
    assert cfg.mixup_alpha == 0.0
    cfg, _ = make_config(TrainRecipe().to_dict(), {})
    assert (cfg.recipe, cfg.mixup_alpha) == ("basic", 0.0)
    old = TrainRecipe().to_dict()
    del old["recipe"]  # a checkpoint saved before recipes existed trains as basic
    assert make_config(old)[0].recipe == "basic"


def test_unknown_recipe_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("recipe: autoaug\n")
    with pytest.raises(ConfigError, match="--recipe must be one of basic, splitnet-cifar, got 'autoaug'"):
        config_for_run(*parse_options(["--config", str(bad)]))
    with pytest.raises(SystemExit):
        main(["--recipe", "autoaug"])
    err = capsys.readouterr().err.replace("'", "")
    assert "invalid choice: autoaug (choose from basic, splitnet-cifar)" in err


def test_recipe_is_saved_and_restored_on_resume(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1", "--threads", "1", "--recipe", "splitnet-cifar")) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["recipe"], saved["mixup_alpha"]) == ("splitnet-cifar", 0.2)
    assert load_ckpt(out / "last.pt")["recipe"]["recipe"] == "splitnet-cifar"
    recipe, _, _ = config_for_run({}, {"resume": str(out)})
    assert (recipe.recipe, recipe.mixup_alpha) == ("splitnet-cifar", 0.2)
    assert main(["--resume", str(out), "--epochs", "2", "--threads", "1", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["recipe"] == "splitnet-cifar"


@pytest.mark.parametrize("groups", [None, 1, 4])
def test_autoaugment_rows_choose_among_the_batch_sub_policies(groups):
    from groupnet.data.augment import _per_row_policy

    policies = [lambda x, i=i: x + i for i in range(25)]  # sub-policy i adds i: the output tells which one ran
    picks = []
    for seed in range(400):
        torch.manual_seed(seed)
        out = _per_row_policy(torch.zeros(64, 1, 1, 1), policies, groups)
        batch = out.flatten().long()
        assert len(batch.unique()) <= (groups or 25)
        picks.append(batch)
    counts = torch.bincount(torch.cat(picks), minlength=25).float()
    assert (counts > 0).all()  # every sub-policy is used, about equally often over batches
    assert counts.max() / counts.mean() < 2, counts
