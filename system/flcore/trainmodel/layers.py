"""Building blocks shared by the model definitions."""
import math

import torch.nn.functional as F
from torch import nn


def to_feature_dim(width: int, feature_dim: int) -> nn.Module:
    """Flattens features of size `width`; a parameter-free adaptive average pool matches `feature_dim`."""
    if width == feature_dim:
        return nn.Flatten()
    return nn.Sequential(nn.Flatten(), nn.AdaptiveAvgPool1d(feature_dim))


def conv_bn_relu(in_width: int, out_width: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_width, out_width, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_width),
        nn.ReLU(inplace=True),
    )


class ResizeTo(nn.Module):
    """Bilinearly resizes inputs to `size` x `size` (patch models need patches that tile the image)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def narrow_input_channels(conv: nn.Conv2d, in_channels: int, fan_in_init: bool = False) -> None:
    """Makes an initialised `conv` read only `in_channels` channels by keeping its first filter slices.

    Slices keep the distribution of fan-out and fixed-std inits; `fan_in_init` rescales for inits
    whose std is sqrt(1 / fan_in), so no random numbers beyond the original init are drawn.
    """
    if in_channels == conv.in_channels:
        return
    kept = conv.weight.detach()[:, :in_channels].clone()
    if fan_in_init:
        kept *= math.sqrt(conv.in_channels / in_channels)
    conv.weight = nn.Parameter(kept)
    conv.in_channels = in_channels
