"""Client models: a registry of named base/head-split models and the FedKTL model families."""
from . import cnn, resnet, small, torchvision_models  # noqa: F401  (importing registers the models)
from .families import FAMILIES, FAMILY_ALIASES, HTC4, build_family_model, family_heads, family_models, with_heads
from .registry import (
    HEADS,
    BaseHeadSplit,
    build_model,
    list_models,
    model_name,
    model_with_state,
    register_model,
    split_model_name,
)

__all__ = ["BaseHeadSplit", "FAMILIES", "FAMILY_ALIASES", "HEADS", "HTC4", "build_family_model", "build_model",
           "family_heads", "family_models", "list_models", "model_name", "model_with_state", "register_model",
           "split_model_name", "with_heads"]
