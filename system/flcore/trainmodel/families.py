"""Heterogeneous model families of the FedKTL paper and HtFLlib: client i gets family[i % len(family)]."""
import math

from .registry import BaseHeadSplit, build_model, list_models, model_name, split_model_name

_HTCPU4 = ["tiny_cnn", "tiny_resnet", "tiny_mobilenet", "tiny_mixer"]
_HTFE8 = ["cnn4", "googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
# HtFLlib's heterogeneous heads (HtC-img-4): hidden widths [512], [512, 512], [512, 256], [512, 128], whose first
# width is the feature dimension; docs list where they differ from these.
HTC4 = ["linear", "mlp512", "mlp256", "mlp128"]


def with_heads(bases: list[str], heads: list[str]) -> list[str]:
    """The family in which client i gets bases[i % len(bases)] with heads[i % len(heads)], as HtFLlib assigns
    them; the pairs repeat after lcm(len(bases), len(heads)) clients."""
    return [model_name(bases[i % len(bases)], heads[i % len(heads)])
            for i in range(math.lcm(len(bases), len(heads)))]


FAMILIES: dict[str, list[str]] = {
    "HtFE2": ["cnn4", "resnet18"],
    "HtFE3": ["resnet10", "resnet18", "resnet34"],
    "HtFE4": ["cnn4", "googlenet", "mobilenet_v2", "resnet18"],
    "HtFE5": ["googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50"],
    "HtFE8": _HTFE8,
    "HtFE9": ["resnet4", "resnet6", "resnet8", "resnet10", "resnet18", "resnet34", "resnet50", "resnet101",
              "resnet152"],
    "HtM10": _HTFE8 + ["vit_b_16", "vit_b_32"],
    "HtFE8-HtC4": with_heads(_HTFE8, HTC4),
    "Res34-HtC4": with_heads(["resnet34"], HTC4),
    # Not in the paper or HtFLlib: CPU demos, of heterogeneous extractors, and of heterogeneous heads too.
    "HtCPU4": _HTCPU4,
    "HtCPU4-HtC4": with_heads(_HTCPU4, HTC4),
}

# HtFLlib's names of the image families (its system/main.py -mf values).
FAMILY_ALIASES = {
    "HtFE-img-2": "HtFE2", "HtFE-img-3": "HtFE3", "HtFE-img-4": "HtFE4", "HtFE-img-5": "HtFE5", "HtFE-img-8": "HtFE8",
    "HtFE-img-9": "HtFE9", "HtM-img-10": "HtM10", "HtFE-img-8-HtC-img-4": "HtFE8-HtC4",
    "Res34-HtC-img-4": "Res34-HtC4",
}


def family_models(name: str) -> list[str]:
    """The model names of family `name` (or its HtFLlib alias), in client order; a model's name is a family of one
    (every client gets that model, e.g. the 4-layer CNN of the paper's cloud-edge experiment)."""
    name = FAMILY_ALIASES.get(name, name)
    if name in FAMILIES:
        return list(FAMILIES[name])
    try:
        split_model_name(name)
    except ValueError:
        raise ValueError(f"unknown model family '{name}'; choose a family ({', '.join(FAMILIES)}; or HtFLlib's "
                         f"name of one, e.g. {next(iter(FAMILY_ALIASES))}) or one model ({', '.join(list_models())}, "
                         f"optionally +head)") from None
    return [name]


def family_heads(name: str) -> list[str]:
    """The head name of each member of family `name`, without building a model."""
    return [split_model_name(member)[1] for member in family_models(name)]


def build_family_model(family: str, client_index: int, num_classes: int, feature_dim: int = 512,
                       in_channels: int = 3, image_size: int = 32) -> BaseHeadSplit:
    """Builds the model of client `client_index` (0-based) in `family`."""
    if isinstance(client_index, bool) or not isinstance(client_index, int) or client_index < 0:
        raise ValueError(f"client_index must be an integer >= 0, got {client_index!r}")
    names = family_models(family)
    return build_model(names[client_index % len(names)], num_classes, feature_dim, in_channels, image_size)
