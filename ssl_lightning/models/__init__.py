"""The networks of the SSL paper as plain ``nn.Module``s, and a generic classification LightningModule."""

from ssl_lightning.models.classifier import ImageClassifier
from ssl_lightning.models.nets import (
    MLP,
    AlexNet,
    CifarConvNet,
    LeNet,
    ResNetCifar,
    resnet20,
    resnet32,
    resnet56,
)

__all__ = [
    "MLP",
    "AlexNet",
    "CifarConvNet",
    "ImageClassifier",
    "LeNet",
    "ResNetCifar",
    "resnet20",
    "resnet32",
    "resnet56",
]
