"""Pickling objects together with the source code of the module that defines their class, in the
format of NVIDIA's ``torch_utils.persistence`` (version 6), so that a pickle loads without that
module and keeps working when the module's code changes.

An instance of a persistent class pickles as the call ``_reconstruct_persistent_obj(meta)``, where
``meta`` is a dict with the keys ``type`` ('class'), ``version`` (6), ``module_src`` (the defining
module's full source), ``class_name`` and ``state`` (the instance's ``__dict__``). Unpickling runs
``module_src`` as a fresh module (once per distinct source), finds the class, and fills in the state
without calling ``__init__``. The source's own imports must be importable when loading, including
this package: that is why NVIDIA's network pickles need ``torch_utils`` and ``dnnlib``.

Loading runs the code stored in the pickle: load only pickles from sources you trust.
"""
import copy
import inspect
import linecache
import sys
import types
import uuid

import torch

import dnnlib

FORMAT_VERSION = 6  # the version NVIDIA's StyleGAN2-ADA, StyleGAN3 and StyleGAN-XL pickles carry

_decorators = set()  # every persistent class made here
_decorator_of = {}  # original class -> its persistent subclass
_import_hooks = []
_source_of_module = {}  # module -> its source code
_module_of_source = {}  # source code -> the module made from it


def persistent_class(orig_class):
    """Class decorator: instances of the returned subclass pickle with their module's source.

    The whole module's source is saved, not the modules it imports. Other classes of the module
    whose instances an object holds must be persistent too (or importable when loading). The
    constructor arguments are recorded as ``init_args`` / ``init_kwargs`` and pickled with the state.
    """
    if not isinstance(orig_class, type):
        raise TypeError(f"persistent_class decorates classes, got {type(orig_class).__name__}")
    if orig_class in _decorators:
        return orig_class
    if orig_class in _decorator_of:
        return _decorator_of[orig_class]
    module = sys.modules.get(orig_class.__module__)
    if module is None:
        raise ValueError(f"the module {orig_class.__module__!r} of {orig_class.__qualname__} is not imported, "
                         f"so its source cannot be saved")
    module_src = _module_to_src(module)

    class Decorator(orig_class):
        _orig_module_src = module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            state = self.__getstate__()
            if state is not None and not isinstance(state, dict):
                raise TypeError(f"{self._orig_class_name}: a persistent object's state must be a dict, "
                                f"got {type(state).__name__}")
            meta = dict(type="class", version=FORMAT_VERSION, module_src=self._orig_module_src,
                        class_name=self._orig_class_name, state=state or {})
            return _reconstruct_persistent_obj, (meta,)

    # Shown in reprs and error messages as the original class.
    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    _decorator_of[orig_class] = Decorator
    return Decorator


def is_persistent(obj):
    """Whether obj is a persistent class or an instance of one."""
    return (isinstance(obj, type) and obj in _decorators) or type(obj) in _decorators


def import_hook(hook):
    """Registers hook(meta) -> meta, called on every persistent object being unpickled, before its
    source runs; meta is a dnnlib.EasyDict with the fields listed in this module's docstring (e.g.
    patch ``meta.module_src`` for an API that changed). Returns hook, so it works as a decorator."""
    if not callable(hook):
        raise TypeError("an import hook must be callable")
    _import_hooks.append(hook)
    return hook


def persistent_copy(module):
    """A deep copy of the torch.nn.Module ``module`` in which ``module`` and each of its submodules
    whose class is defined in the same Python module as ``module``'s class are persistent: its
    pickle carries that Python module's source and loads where the module is not importable.
    Other classes (torch's, for instance) stay pickled by reference."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"persistent_copy takes a torch.nn.Module, got {type(module).__name__}")
    home = type(module).__module__
    copied = copy.deepcopy(module)
    for submodule in copied.modules():
        if type(submodule).__module__ == home and not is_persistent(submodule):
            # Same layout (a subclass adding only methods), so the class can be swapped in place.
            submodule.__class__ = persistent_class(type(submodule))
    return copied


def _reconstruct_persistent_obj(meta):
    """Rebuilds a persistent object from its pickled meta (pickle calls this by name)."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        if meta is None:
            raise TypeError(f"the persistence import hook {hook!r} returned None; it must return meta")
    if meta.version != FORMAT_VERSION or meta.type != "class":
        raise ValueError(f"unsupported persistent object (type {meta.type!r}, version {meta.version!r}); "
                         f"this loader reads type 'class', version {FORMAT_VERSION}")
    module = _src_to_module(meta.module_src)
    orig_class = module.__dict__.get(meta.class_name)
    if not isinstance(orig_class, type):
        raise ValueError(f"the pickled source defines no class {meta.class_name!r}")
    cls = persistent_class(orig_class)
    obj = cls.__new__(cls)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(meta.state)  # torch.nn.Module's adds the attributes newer PyTorch versions expect
    else:
        obj.__dict__.update(meta.state)
    return obj


def _module_to_src(module):
    source = _source_of_module.get(module)
    if source is None:
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError) as error:
            raise ValueError(f"cannot read the source of module {module.__name__!r} ({error}); "
                             f"persistent classes must be defined in a .py file") from None
        _source_of_module[module] = source
        _module_of_source[source] = module
    return source


def _src_to_module(source):
    module = _module_of_source.get(source)
    if module is None:
        name = "_imported_module_" + uuid.uuid4().hex
        module = types.ModuleType(name)
        # Registered before running, so that persistent_class inside the source finds the source.
        sys.modules[name] = module
        _source_of_module[module] = source
        _module_of_source[source] = module
        filename = f"<persistent source {name}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # readable tracebacks
        try:
            exec(compile(source, filename, "exec"), module.__dict__)
        except BaseException:
            # Forget the half-run module, so a later load (say, after installing what it imports) runs it again.
            del sys.modules[name], _source_of_module[module], _module_of_source[source], linecache.cache[filename]
            raise
    return module
