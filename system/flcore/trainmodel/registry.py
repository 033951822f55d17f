"""Registry of named client models, each built as a feature extractor ("base") plus a head."""
from typing import Callable

import torch
from torch import nn

# A base builder maps (feature_dim, in_channels, image_size) to a module [B, C, H, W] -> [B, feature_dim].
BaseBuilder = Callable[[int, int, int], nn.Module]
HeadFactory = Callable[[int, int], nn.Module]

SUPPORTED_IN_CHANNELS = (1, 3)
MIN_IMAGE_SIZE = 16
VIT_HEAD_WIDTH = 768


def linear_head(feature_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(feature_dim, num_classes)


def vit_head(feature_dim: int, num_classes: int) -> nn.Module:
    """Pre-logits layer with Tanh then the classifier, as torchvision ViTs with a representation size."""
    return nn.Sequential(nn.Linear(feature_dim, VIT_HEAD_WIDTH), nn.Tanh(), nn.Linear(VIT_HEAD_WIDTH, num_classes))


class BaseHeadSplit(nn.Module):
    """A classifier split into `base` (images -> features) and `head` (features -> logits)."""

    def __init__(self, base: nn.Module, head: nn.Module, feature_dim: int, num_classes: int, model_name: str):
        super().__init__()
        self.base = base
        self.head = head
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.model_name = model_name

    def forward(self, x):
        return self.head(self.base(x))


_REGISTRY: dict[str, tuple[BaseBuilder, HeadFactory]] = {}


def register_model(name: str, head: HeadFactory = linear_head) -> Callable[[BaseBuilder], BaseBuilder]:
    """Decorator registering a base builder under a lowercase `name`, paired with a head factory."""
    if not name or name != name.lower():
        raise ValueError(f"model name {name!r} must be a non-empty lowercase string")

    def decorator(build_base: BaseBuilder) -> BaseBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered; pick another name")
        _REGISTRY[name] = (build_base, head)
        return build_base

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _check_int(label: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")


def build_model(name: str, num_classes: int, feature_dim: int = 512, in_channels: int = 3,
                image_size: int = 32) -> BaseHeadSplit:
    """Builds model `name`; its parameters are drawn from torch's global RNG only."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; choose from: {', '.join(list_models())}")
    _check_int("num_classes", num_classes, 1)
    _check_int("feature_dim", feature_dim, 1)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    if in_channels not in SUPPORTED_IN_CHANNELS:
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
    build_base, head_factory = _REGISTRY[name]
    base = build_base(feature_dim, in_channels, image_size)
    return BaseHeadSplit(base, head_factory(feature_dim, num_classes), feature_dim, num_classes, name)


def model_with_state(name, num_classes, feature_dim, in_channels, image_size, state):
    """Model `name` holding `state` (a state_dict); building it leaves torch's global RNG where it was, so a client
    that receives a shared model (FML's meme, FedKD's mentee) draws its own initial weights as before."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(name, num_classes, feature_dim, in_channels, image_size)
    model.load_state_dict(state)
    return model
