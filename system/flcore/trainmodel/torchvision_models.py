"""torchvision architectures (random init, classification layer removed) as client bases.

Dropout that preceded the removed classifier (GoogLeNet, MobileNetV2) stays part of the base.
"""
from torch import nn
from torchvision import models

from .layers import ResizeTo, narrow_input_channels, to_feature_dim
from .registry import register_model

VIT_IMAGE_SIZE = 32


def _register_resnet(name: str, constructor) -> None:
    @register_model(name)
    def build(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
        net = constructor(weights=None)
        narrow_input_channels(net.conv1, in_channels)
        net.fc = to_feature_dim(net.fc.in_features, feature_dim)
        return net


for _name, _constructor in (("resnet18", models.resnet18), ("resnet34", models.resnet34),
                            ("resnet50", models.resnet50), ("resnet101", models.resnet101),
                            ("resnet152", models.resnet152)):
    _register_resnet(_name, _constructor)


@register_model("googlenet")
def googlenet(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
    # Its max-pools use ceil_mode, so 28 px inputs still reach the global pool.
    net = models.googlenet(weights=None, aux_logits=False, init_weights=True)
    narrow_input_channels(net.conv1.conv, in_channels)
    net.fc = to_feature_dim(net.fc.in_features, feature_dim)
    return net


@register_model("mobilenet_v2")
def mobilenet_v2(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
    net = models.mobilenet_v2(weights=None)
    narrow_input_channels(net.features[0][0], in_channels)
    net.classifier[-1] = to_feature_dim(net.last_channel, feature_dim)
    return net


def _register_vit(name: str, constructor) -> None:
    @register_model(name, head="vit")
    def build(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
        net = constructor(weights=None, image_size=VIT_IMAGE_SIZE)
        narrow_input_channels(net.conv_proj, in_channels, fan_in_init=True)
        net.heads = to_feature_dim(net.hidden_dim, feature_dim)
        return nn.Sequential(ResizeTo(VIT_IMAGE_SIZE), net)


_register_vit("vit_b_16", models.vit_b_16)
_register_vit("vit_b_32", models.vit_b_32)
