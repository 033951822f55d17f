"""Loading network pickles: NVIDIA's (StyleGAN2, StyleGAN2-ADA, StyleGAN3, StyleGAN-XL; written
in 2021-2022 with NumPy 1 and PyTorch 1) and the project's own, on current NumPy and PyTorch.

``load_network_pkl(f)['G_ema']`` is the call NVIDIA's scripts and network code use. Compared with
``pickle.load``, the loader here also:

- reads NumPy 1 names (``numpy.core.*``, ``numpy._core.*`` in NumPy 2) without going through
  NumPy's compatibility aliases;
- stands in an ``UnavailableObject`` for any object whose code cannot be imported, so that the
  rest of the file still loads. StyleGAN-XL's discriminator, for instance, is pickled by reference
  to the stylegan-xl repository's ``pg_modules`` and to old ``timm`` releases, while its generator
  is self-contained. ``load_network_pkl`` refuses a generator ``G_ema`` that has stand-ins.

Loading runs code stored in the pickle: load only pickles from sources you trust.
"""
import pickle
import types

import numpy as np
import torch

from torch_utils import misc, persistence

NETWORK_KEYS = ("G", "D", "G_ema")
FP16_SETTINGS = {"num_fp16_res": 4, "conv_clamp": 256}  # NVIDIA's mixed-precision defaults
# NumPy 2 renamed the package that pickled arrays and scalars name.
_NUMPY_RENAMED = ("numpy.core", "numpy._core") if int(np.__version__.split(".")[0]) >= 2 else None
_PERSISTENT_RECONSTRUCTOR = ("torch_utils.persistence", "_reconstruct_persistent_obj")
_stand_in_classes = {}


class UnavailableObject:
    """Stands in for a pickled object whose code could not be imported; keeps its pickled state.

    Subclasses made by the loader carry ``reason`` (why, one line) and ``missing_module`` (the
    module to install, or None when the module exists but lacks the name)."""

    reason = ""
    missing_module = None

    def __init__(self, *args, **kwargs):
        vars(self)["pickled_args"] = args

    def __setstate__(self, state):
        vars(self)["pickled_state"] = state

    def __setitem__(self, key, value):  # contents of a pickled dict subclass
        vars(self).setdefault("pickled_items", {})[key] = value

    def append(self, item):  # contents of a pickled list subclass
        vars(self).setdefault("pickled_items", []).append(item)


def _stand_in_class(module, name, reason, missing_module):
    key = (module, name, reason)
    if key not in _stand_in_classes:
        _stand_in_classes[key] = type(name, (UnavailableObject,), {
            "__module__": module, "reason": reason, "missing_module": missing_module})
    return _stand_in_classes[key]


def _reconstruct_or_stand_in(meta):
    """persistence._reconstruct_persistent_obj, with a stand-in when the embedded source imports a
    module that is not installed."""
    try:
        return persistence._reconstruct_persistent_obj(meta)
    except ImportError as error:
        missing = error.name or "?"
        class_name = str(dict(meta).get("class_name", "object"))
        return _stand_in_class("<embedded source>", class_name,
                               f"needs the module '{missing}' (imported by the pickled source of "
                               f"{class_name})", missing)()


class NetworkUnpickler(pickle.Unpickler):
    """pickle.Unpickler that reads NumPy 1 names, and stands in UnavailableObject subclasses for
    classes and functions that cannot be imported (see the module docstring)."""

    def find_class(self, module, name):
        if module.startswith("dnnlib.tflib"):
            raise pickle.UnpicklingError(
                "this is a TensorFlow-era StyleGAN pickle; convert it to the PyTorch format first with "
                "NVIDIA's stylegan2-ada-pytorch: python legacy.py --source=OLD.pkl --dest=NEW.pkl")
        if _NUMPY_RENAMED and (module == _NUMPY_RENAMED[0] or module.startswith(_NUMPY_RENAMED[0] + ".")):
            module = _NUMPY_RENAMED[1] + module[len(_NUMPY_RENAMED[0]):]
        if (module, name) == _PERSISTENT_RECONSTRUCTOR:
            return _reconstruct_or_stand_in
        try:
            return super().find_class(module, name)
        except ImportError as error:
            missing = error.name or module
            return _stand_in_class(module, name, f"needs the module '{missing}' (for {module}.{name})", missing)
        except AttributeError:
            return _stand_in_class(module, name, f"needs {module}.{name}, which the installed '{module}' lacks",
                                   None)


def load_pickle(f):
    """Unpickles the binary file object f with NetworkUnpickler."""
    return NetworkUnpickler(f).load()


def find_unavailable(obj):
    """The UnavailableObject subclasses used anywhere inside obj (as classes or instances), sorted by
    name; empty when everything obj holds was rebuilt from real code."""
    found, seen, pending = {}, set(), [obj]
    while pending:
        item = pending.pop()
        if id(item) in seen or isinstance(item, (str, bytes, int, float, complex, torch.Tensor, np.ndarray)):
            continue
        seen.add(id(item))
        if isinstance(item, type):
            if issubclass(item, UnavailableObject):
                found[f"{item.__module__}.{item.__qualname__}"] = item
            continue
        if isinstance(item, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
            continue
        pending.append(type(item))
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        if hasattr(item, "__dict__"):
            pending.extend(vars(item).values())
    return [found[name] for name in sorted(found)]


def load_network_pkl(f, force_fp16=False):
    """Loads a network pickle from the binary file object f: a dict with 'G_ema' (the generator) and
    usually 'G', 'D', 'augment_pipe' and 'training_set_kwargs' ('augment_pipe' and
    'training_set_kwargs' are None when absent). force_fp16 rebuilds the persistent networks with
    NVIDIA's mixed-precision settings (num_fp16_res=4, conv_clamp=256), keeping their weights.

    Raises ValueError for a pickle without a 'G_ema' network, and ModuleNotFoundError (or
    ImportError) when G_ema needs code that is not installed.
    """
    data = load_pickle(f)
    if not isinstance(data, dict) or "G_ema" not in data:
        unavailable = find_unavailable(data)
        if unavailable:
            _raise_unavailable("the pickle", unavailable)
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"not a network pickle: expected a dict with 'G_ema', found {found}")
    unavailable = find_unavailable(data["G_ema"])
    if unavailable:
        _raise_unavailable("G_ema", unavailable)
    if not isinstance(data["G_ema"], torch.nn.Module):
        raise ValueError(f"not a network pickle: 'G_ema' is a {type(data['G_ema']).__name__}, not a torch.nn.Module")
    data.setdefault("training_set_kwargs", None)
    data.setdefault("augment_pipe", None)
    if force_fp16:
        for key in NETWORK_KEYS:
            if key in data:
                data[key] = _with_fp16_settings(data[key])
    return data


def _raise_unavailable(what, unavailable):
    reasons = "; ".join(sorted({cls.reason for cls in unavailable}))
    missing = next((cls.missing_module for cls in unavailable if cls.missing_module), None)
    message = f"{what} cannot be rebuilt: it {reasons}"
    if missing:
        raise ModuleNotFoundError(message, name=missing)
    raise ImportError(message)


def _with_fp16_settings(network):
    """network rebuilt from its recorded constructor arguments with FP16_SETTINGS, or network itself
    when those settings already hold or it did not record its arguments (not persistent)."""
    if not isinstance(network, torch.nn.Module) or "_init_kwargs" not in vars(network):
        return network
    kwargs = network.init_kwargs
    # NVIDIA's generators take the synthesis settings flat, some forks nested in 'synthesis_kwargs'.
    settings = kwargs.get("synthesis_kwargs", kwargs)
    settings.update(FP16_SETTINGS)
    if kwargs == network.init_kwargs:
        return network
    rebuilt = type(network)(*network.init_args, **kwargs).eval().requires_grad_(False)
    misc.copy_params_and_buffers(network, rebuilt, require_all=True)
    return rebuilt
