"""Client models: a registry of named base/head-split models and the FedKTL model families."""
from . import cnn, resnet, small, torchvision_models  # noqa: F401  (importing registers the models)
from .families import FAMILIES, build_family_model, family_models
from .registry import BaseHeadSplit, build_model, list_models, model_with_state, register_model

__all__ = ["BaseHeadSplit", "FAMILIES", "build_family_model", "build_model", "family_models", "list_models",
           "model_with_state", "register_model"]
