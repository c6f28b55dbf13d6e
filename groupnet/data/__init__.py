"""Data for groupnet's trainer: data sets (digits, CIFAR-10/100, image folder), tensor augmentation, K-view
stacking, a deterministic rank-aware sampler and loaders."""

from groupnet.data.augment import RECIPES, Augment, cutout, mixup, recipe_augment
from groupnet.data.cifar import load_cifar
from groupnet.data.digits import load_digits_split
from groupnet.data.errors import DataError
from groupnet.data.image_folder import ImageFolderDataset, load_image_folder
from groupnet.data.images import TensorImageDataset
from groupnet.data.loaders import eval_loader, train_loader
from groupnet.data.registry import DATASETS, DataBundle, labels_of, load_dataset
from groupnet.data.sampler import EpochSampler
from groupnet.data.views import MultiViewDataset, SingleViewDataset, sample_generator

__all__ = [
    "Augment", "DATASETS", "DataBundle", "DataError", "EpochSampler", "ImageFolderDataset", "MultiViewDataset",
    "RECIPES", "SingleViewDataset", "TensorImageDataset", "cutout", "eval_loader", "labels_of", "load_cifar",
    "load_digits_split", "load_dataset", "load_image_folder", "mixup", "recipe_augment",
    "sample_generator", "train_loader",
]
