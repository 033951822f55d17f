"""CPU-sized models (well under 0.5M parameters each) of four different kinds, for demos and tests."""
from torch import nn

from .layers import ResizeTo, conv_bn_relu, to_feature_dim
from .registry import register_model
from .resnet import cifar_resnet

MIXER_IMAGE_SIZE = 32


@register_model("tiny_cnn")
def tiny_cnn(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
    """Plain conv-BN-ReLU stack, 32/64/128 wide, ceil-mode pooling so odd sizes (28 -> 14 -> 7) work."""
    return nn.Sequential(
        conv_bn_relu(in_channels, 32), nn.MaxPool2d(2, ceil_mode=True),
        conv_bn_relu(32, 64), nn.MaxPool2d(2, ceil_mode=True),
        conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1), to_feature_dim(128, feature_dim),
    )


@register_model("tiny_resnet")
def tiny_resnet(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
    return cifar_resnet((16, 32, 64), in_channels, feature_dim)


def _separable(in_width: int, out_width: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(in_width, in_width, stride=stride, groups=in_width),
                         conv_bn_relu(in_width, out_width, kernel_size=1))


@register_model("tiny_mobilenet")
def tiny_mobilenet(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
    """MobileNet(v1)-style: strided stem, then depthwise 3x3 + pointwise 1x1 blocks."""
    return nn.Sequential(
        conv_bn_relu(in_channels, 32, stride=2),
        _separable(32, 64, 1), _separable(64, 128, 2), _separable(128, 128, 1), _separable(128, 256, 2),
        nn.AdaptiveAvgPool2d(1), to_feature_dim(256, feature_dim),
    )


class MixerBlock(nn.Module):
    """MLP-Mixer layer: an MLP across patches (token mixing), then one across channels."""

    def __init__(self, num_tokens: int, width: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.token_norm = nn.LayerNorm(width)
        self.token_mlp = nn.Sequential(nn.Linear(num_tokens, token_hidden), nn.GELU(),
                                       nn.Linear(token_hidden, num_tokens))
        self.channel_norm = nn.LayerNorm(width)
        self.channel_mlp = nn.Sequential(nn.Linear(width, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, width))

    def forward(self, tokens):  # tokens: [B, num_tokens, width]
        tokens = tokens + self.token_mlp(self.token_norm(tokens).transpose(1, 2)).transpose(1, 2)
        return tokens + self.channel_mlp(self.channel_norm(tokens))


class TinyMixer(nn.Module):
    """MLP-Mixer on 4x4 patches of the input resized to 32 px (a fixed 8x8 token grid)."""

    def __init__(self, in_channels: int, feature_dim: int, patch_size: int = 4, width: int = 96, depth: int = 4):
        super().__init__()
        num_tokens = (MIXER_IMAGE_SIZE // patch_size) ** 2
        self.resize = ResizeTo(MIXER_IMAGE_SIZE)
        self.patchify = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.blocks = nn.Sequential(*(MixerBlock(num_tokens, width, num_tokens, 2 * width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.to_features = to_feature_dim(width, feature_dim)

    def forward(self, x):
        tokens = self.patchify(self.resize(x)).flatten(2).transpose(1, 2)
        return self.to_features(self.norm(self.blocks(tokens)).mean(dim=1))


@register_model("tiny_mixer")
def tiny_mixer(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
    return TinyMixer(in_channels, feature_dim)
