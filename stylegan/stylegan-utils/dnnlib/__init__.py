"""The part of NVIDIA's ``dnnlib`` package that their network pickles and network code use.

Pickles store configuration dicts as ``dnnlib.util.EasyDict``; network code also reaches it as
``dnnlib.EasyDict`` and opens files and URLs with ``dnnlib.util.open_url``.
"""
from . import util
from .util import EasyDict, make_cache_dir_path

__all__ = ["EasyDict", "make_cache_dir_path", "util"]
