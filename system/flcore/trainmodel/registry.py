"""Registry of named client models, each built as a feature extractor ("base") plus a head.

A model name is a registered base's name (the base with its own head, e.g. "resnet34") or "base+head" (the base
with a registered head instead, e.g. "resnet34+mlp256"), so the name alone rebuilds the architecture."""
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


def mlp_head(width: int) -> HeadFactory:
    """The factory of a one-hidden-layer head: Linear(feature_dim, width), ReLU, Linear(width, num_classes)."""
    def build(feature_dim: int, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Linear(feature_dim, width), nn.ReLU(), nn.Linear(width, num_classes))
    return build


HEADS: dict[str, HeadFactory] = {"linear": linear_head, "vit": vit_head}
# HtFLlib's heterogeneous heads (HtC-img-4) past the first: hidden widths 512, 256 and 128.
HEADS.update((f"mlp{width}", mlp_head(width)) for width in (512, 256, 128))


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


# A base's name -> (its builder, the name of its own head in HEADS).
_REGISTRY: dict[str, tuple[BaseBuilder, str]] = {}


def register_model(name: str, head: str = "linear") -> Callable[[BaseBuilder], BaseBuilder]:
    """Decorator registering a base builder under a lowercase `name`, paired with its head (a name in HEADS)."""
    if not name or name != name.lower() or "+" in name:
        raise ValueError(f"model name {name!r} must be a non-empty lowercase string without '+'")
    if head not in HEADS:
        raise ValueError(f"unknown head '{head}'; choose from: {', '.join(HEADS)}")

    def decorator(build_base: BaseBuilder) -> BaseBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered; pick another name")
        _REGISTRY[name] = (build_base, head)
        return build_base

    return decorator


def list_models() -> list[str]:
    """The registered bases' names, each a model with the base's own head."""
    return sorted(_REGISTRY)


def split_model_name(name: str) -> tuple[str, str]:
    """(base, head) of model `name`; a ValueError naming the choices when either is unknown."""
    base, plus, head = name.partition("+")
    if base not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; choose from: {', '.join(list_models())} "
                         f"(optionally +head, a head of: {', '.join(HEADS)})")
    if not plus:
        return base, _REGISTRY[base][1]
    if head not in HEADS:
        raise ValueError(f"unknown head '{head}' in model '{name}'; choose from: {', '.join(HEADS)}")
    return base, head


def model_name(base: str, head: str) -> str:
    """The name of `base` with `head`: the base's own name when that is its own head, so one architecture has one
    name."""
    return base if head == _REGISTRY[base][1] else f"{base}+{head}"


def _check_int(label: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")


def build_model(name: str, num_classes: int, feature_dim: int = 512, in_channels: int = 3,
                image_size: int = 32) -> BaseHeadSplit:
    """Builds model `name` (see the module's docstring); its parameters are drawn from torch's global RNG only, the
    base's first."""
    base_name, head_name = split_model_name(name)
    _check_int("num_classes", num_classes, 1)
    _check_int("feature_dim", feature_dim, 1)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    if in_channels not in SUPPORTED_IN_CHANNELS:
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
    base = _REGISTRY[base_name][0](feature_dim, in_channels, image_size)
    return BaseHeadSplit(base, HEADS[head_name](feature_dim, num_classes), feature_dim, num_classes,
                         model_name(base_name, head_name))


def model_with_state(name, num_classes, feature_dim, in_channels, image_size, state):
    """Model `name` holding `state` (a state_dict); building it leaves torch's global RNG where it was, so a client
    that receives a shared model (FML's meme, FedKD's mentee) draws its own initial weights as before."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(name, num_classes, feature_dim, in_channels, image_size)
    model.load_state_dict(state)
    return model
