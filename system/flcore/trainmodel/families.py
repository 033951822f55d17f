"""Heterogeneous model families of the FedKTL paper: client i gets family[i % len(family)]."""
from .registry import BaseHeadSplit, build_model, list_models

_HTFE8 = ["cnn4", "googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]

FAMILIES: dict[str, list[str]] = {
    "HtFE2": ["cnn4", "resnet18"],
    "HtFE3": ["resnet10", "resnet18", "resnet34"],
    "HtFE4": ["cnn4", "googlenet", "mobilenet_v2", "resnet18"],
    "HtFE8": _HTFE8,
    "HtFE9": ["resnet4", "resnet6", "resnet8", "resnet10", "resnet18", "resnet34", "resnet50", "resnet101",
              "resnet152"],
    "HtM10": _HTFE8 + ["vit_b_16", "vit_b_32"],
    "HtCPU4": ["tiny_cnn", "tiny_resnet", "tiny_mobilenet", "tiny_mixer"],  # not in the paper: CPU demos
}


def family_models(name: str) -> list[str]:
    """The model names of family `name`, in client order; a registered model's name is a family of one
    (every client gets that model, e.g. the 4-layer CNN of the paper's cloud-edge experiment)."""
    if name in FAMILIES:
        return list(FAMILIES[name])
    if name in list_models():
        return [name]
    raise ValueError(f"unknown model family '{name}'; choose a family ({', '.join(FAMILIES)}) "
                     f"or one model ({', '.join(list_models())})")


def build_family_model(family: str, client_index: int, num_classes: int, feature_dim: int = 512,
                       in_channels: int = 3, image_size: int = 32) -> BaseHeadSplit:
    """Builds the model of client `client_index` (0-based) in `family`."""
    if isinstance(client_index, bool) or not isinstance(client_index, int) or client_index < 0:
        raise ValueError(f"client_index must be an integer >= 0, got {client_index!r}")
    names = family_models(family)
    return build_model(names[client_index % len(names)], num_classes, feature_dim, in_channels, image_size)
