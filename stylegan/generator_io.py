"""Saving and loading generators as pickles shaped like NVIDIA's: a dict with the key 'G_ema'.

Standard pickle stores a class by its module path, so loading needs that module importable:
``compact_stylegan`` (put ``<repo>/stylegan`` on sys.path) for pickles written here, NVIDIA's
``dnnlib`` / ``torch_utils`` packages for their official pickles. Unpickling runs code from the
file: load only pickles from sources you trust.
"""
import copy
import os
import pickle
import tempfile

import torch.nn as nn

GENERATOR_KEY = "G_ema"
REQUIRED_ATTRIBUTES = ("z_dim", "w_dim", "c_dim", "num_ws", "img_resolution", "img_channels",
                       "mapping", "synthesis")
NVIDIA_MODULES = ("dnnlib", "torch_utils")
DOWNLOAD_HINT = ("download pages: stylegan/stylegan-3-models/README.md, "
                 "stylegan/stylegan-xl-models/README.md")


class GeneratorLoadError(ValueError):
    """A generator pickle that cannot be used; the message names the fix."""


def save_generator_pickle(G: nn.Module, path) -> None:
    """Writes {'G_ema': G} (a CPU copy, so any machine can load it) atomically to path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    generator = copy.deepcopy(G).eval().requires_grad_(False).cpu()
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


def _unpickle(path):
    try:
        with open(path, "rb") as file:
            return pickle.load(file)
    except ModuleNotFoundError as error:
        top_level = (error.name or "").split(".")[0]
        if top_level in NVIDIA_MODULES:
            raise GeneratorLoadError(
                f"{path} is an official NVIDIA pickle: unpickling it needs their '{top_level}' module, "
                f"and the loader for such pickles, stylegan/stylegan-utils, is not in this version yet; "
                f"use a pickle saved by generator_io.save_generator_pickle ({DOWNLOAD_HINT})") from None
        raise GeneratorLoadError(
            f"{path} needs the module '{error.name}' to unpickle: install it or put its folder on "
            f"sys.path (for compact_stylegan, <repo>/stylegan) ({DOWNLOAD_HINT})") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
            RuntimeError, TypeError, ValueError, UnicodeDecodeError) as error:
        detail = " ".join(str(error).split())  # keeps the message on one line
        raise GeneratorLoadError(
            f"{path} is not a readable generator pickle ({type(error).__name__}: {detail}); "
            f"re-download or re-save it ({DOWNLOAD_HINT})") from None


def load_generator_pickle(path, device="cpu") -> nn.Module:
    """Reads G from a pickle holding {'G_ema': G}; returns it frozen, in eval mode, on device."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GeneratorLoadError(f"generator pickle not found: {path}; pass the path of a "
                                 f"downloaded or saved .pkl file ({DOWNLOAD_HINT})")
    data = _unpickle(path)
    if not isinstance(data, dict) or GENERATOR_KEY not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise GeneratorLoadError(
            f"{path} holds no '{GENERATOR_KEY}' generator (found {found}); use a generator pickle "
            f"such as NVIDIA's network pickles or one saved by save_generator_pickle ({DOWNLOAD_HINT})")
    generator = data[GENERATOR_KEY]
    missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(generator, name)]
    if not isinstance(generator, nn.Module) or missing:
        raise GeneratorLoadError(
            f"{path}: '{GENERATOR_KEY}' is a {type(generator).__name__} without the StyleGAN generator "
            f"interface (torch.nn.Module with {', '.join(REQUIRED_ATTRIBUTES)}; missing: "
            f"{', '.join(missing) or 'nn.Module base'}); use a StyleGAN generator pickle ({DOWNLOAD_HINT})")
    return generator.eval().requires_grad_(False).to(device)
