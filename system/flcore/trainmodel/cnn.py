"""The 4-layer CNN of FedAvg (two 5x5 convolutions, one hidden linear layer, the head)."""
from torch import nn

from .registry import register_model


def _side_after_convs(image_size: int) -> int:
    # Each stage: unpadded 5x5 conv (-4 px), then 2x2 max-pool (floor halving).
    for _ in range(2):
        image_size = (image_size - 4) // 2
    return image_size


@register_model("cnn4")
def fedavg_cnn(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
    side = _side_after_convs(image_size)
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side * side, feature_dim), nn.ReLU(inplace=True),
    )
