"""Saving and loading generators as pickles shaped like NVIDIA's: a dict with the key 'G_ema'.

Loading goes through ``stylegan/stylegan-utils``, the project's implementation of the modules
NVIDIA's network pickles import (``dnnlib``, ``torch_utils``, ``legacy``); this module puts that
folder on sys.path itself. NVIDIA's official pickles (StyleGAN2/2-ADA/3, StyleGAN-XL) load with it,
and so do pickles written here: by default they store the generator's classes by module path
(``compact_stylegan``, importable once the project is installed: ``pip install -e .``); ``self_contained=True`` embeds
the source instead, as NVIDIA's pickles do. Unpickling runs code from the file: load only pickles
from sources you trust.
"""
import copy
import importlib
import os
import pickle
import sys
import tempfile

import torch.nn as nn

GENERATOR_KEY = "G_ema"
REQUIRED_ATTRIBUTES = ("z_dim", "w_dim", "c_dim", "num_ws", "img_resolution", "img_channels",
                       "mapping", "synthesis")
STYLEGAN_UTILS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stylegan-utils")
DOWNLOAD_HINT = ("download pages: stylegan/stylegan-3-models/README.md, "
                 "stylegan/stylegan-xl-models/README.md")


class GeneratorLoadError(ValueError):
    """A generator pickle that cannot be used; the message names the fix."""


def add_stylegan_utils_to_path() -> None:
    """Puts stylegan/stylegan-utils first on sys.path, so the module names NVIDIA's pickles and
    network code import (dnnlib, torch_utils, legacy) resolve to the project's implementation. The project's only
    sys.path change: the pickles name those modules as top-level ones, so they cannot be an installed package
    without claiming such generic names for every program in the environment."""
    if STYLEGAN_UTILS_DIR not in sys.path:
        sys.path.insert(0, STYLEGAN_UTILS_DIR)


def _import_from_stylegan_utils(name):
    add_stylegan_utils_to_path()
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        detail = " ".join(str(error).split())
        raise GeneratorLoadError(f"cannot import {name} from {STYLEGAN_UTILS_DIR} ({type(error).__name__}: "
                                 f"{detail}); restore stylegan/stylegan-utils from the repository") from None
    location = os.path.realpath(getattr(module, "__file__", None) or "?")
    if not location.startswith(os.path.realpath(STYLEGAN_UTILS_DIR) + os.sep):
        raise GeneratorLoadError(f"another module named '{name}' ({location}) is imported instead of the one in "
                                 f"{STYLEGAN_UTILS_DIR}; run without that module's folder on sys.path")
    return module


def save_generator_pickle(G: nn.Module, path, self_contained: bool = False) -> None:
    """Writes {'G_ema': G} (a CPU copy, so any machine can load it) atomically to path.

    self_contained=True embeds the source of G's module (NVIDIA's persistence format), so that the
    file loads with only stylegan/stylegan-utils on sys.path, like NVIDIA's pickles."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if self_contained:
        generator = _import_from_stylegan_utils("torch_utils.persistence").persistent_copy(G)
    else:
        generator = copy.deepcopy(G)
    generator = generator.eval().requires_grad_(False).cpu()
    handle, temp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pkl")
    try:
        with os.fdopen(handle, "wb") as file:
            pickle.dump({GENERATOR_KEY: generator}, file, protocol=pickle.HIGHEST_PROTOCOL)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


def _missing_module_error(path, module_name):
    return GeneratorLoadError(
        f"{path} needs the module '{module_name}' to unpickle: install it (compact_stylegan comes with this "
        f"project: pip install -e .) ({DOWNLOAD_HINT})")


def _unpickle(path, legacy):
    try:
        with open(path, "rb") as file:
            return legacy.load_pickle(file)
    except ModuleNotFoundError as error:
        raise _missing_module_error(path, error.name) from None
    except Exception as error:  # a corrupt or foreign file can fail in any way: report it in one line
        detail = " ".join(str(error).split())
        raise GeneratorLoadError(
            f"{path} is not a readable generator pickle ({type(error).__name__}: {detail}); "
            f"re-download or re-save it ({DOWNLOAD_HINT})") from None


def _check_rebuilt(path, obj, legacy):
    """Raises if the loader had to stand in placeholders for code that obj needs."""
    unavailable = legacy.find_unavailable(obj)
    missing = [cls.missing_module for cls in unavailable if cls.missing_module]
    if missing:
        raise _missing_module_error(path, missing[0])
    if unavailable:
        raise GeneratorLoadError(f"{path} {unavailable[0].reason}: install a version that has it "
                                 f"({DOWNLOAD_HINT})")


def load_generator_pickle(path, device="cpu") -> nn.Module:
    """Reads G from a pickle holding {'G_ema': G} (NVIDIA's network pickles or ours); returns it
    frozen, in eval mode, on device."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GeneratorLoadError(f"generator pickle not found: {path}; pass the path of a "
                                 f"downloaded or saved .pkl file ({DOWNLOAD_HINT})")
    legacy = _import_from_stylegan_utils("legacy")
    data = _unpickle(path, legacy)
    if not isinstance(data, dict) or GENERATOR_KEY not in data:
        _check_rebuilt(path, data, legacy)
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise GeneratorLoadError(
            f"{path} holds no '{GENERATOR_KEY}' generator (found {found}); use a generator pickle "
            f"such as NVIDIA's network pickles or one saved by save_generator_pickle ({DOWNLOAD_HINT})")
    generator = data[GENERATOR_KEY]
    _check_rebuilt(path, generator, legacy)
    missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(generator, name)]
    if not isinstance(generator, nn.Module) or missing:
        raise GeneratorLoadError(
            f"{path}: '{GENERATOR_KEY}' is a {type(generator).__name__} without the StyleGAN generator "
            f"interface (torch.nn.Module with {', '.join(REQUIRED_ATTRIBUTES)}; missing: "
            f"{', '.join(missing) or 'nn.Module base'}); use a StyleGAN generator pickle ({DOWNLOAD_HINT})")
    return generator.eval().requires_grad_(False).to(device)
