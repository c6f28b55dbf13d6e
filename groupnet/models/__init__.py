"""The SplitNet model zoo, built from groupnet's grouped layers: ``build_model(arch, branches=K, ...)``.

Every model takes K per-branch views ``(N, K*in_channels, H, W)`` or one shared view ``(N, in_channels, H, W)``
and returns the K branches' logits ``(N, K*num_classes)`` (branch k at ``[:, k*num_classes:(k+1)*num_classes]``).
"""

from groupnet.models.base import GroupedClassifier
from groupnet.models.divide import divide, split_drop_rate, split_weight_decay
from groupnet.models.registry import arch_spec, available_models, build_from_spec, build_model, model_descriptions
from groupnet.models.mobilenetv2 import MobileNetV2
from groupnet.models.resnet import CifarResNet
from groupnet.models.small_cnn import SmallCNN
from groupnet.models.spec import ArchSpec
from groupnet.models.splitnet_resnet import SplitNetResNet
from groupnet.models.wrn import WideResNet

__all__ = [
    "ArchSpec",
    "CifarResNet",
    "GroupedClassifier",
    "MobileNetV2",
    "SmallCNN",
    "SplitNetResNet",
    "WideResNet",
    "arch_spec",
    "available_models",
    "build_from_spec",
    "build_model",
    "divide",
    "model_descriptions",
    "split_drop_rate",
    "split_weight_decay",
]
