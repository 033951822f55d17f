"""Helpers NVIDIA's network code calls from ``torch_utils.misc``: shape assertions, tracer-warning
suppression, profiling labels, parameter copying and cached constant tensors."""
import contextlib
import functools
import warnings

import numpy as np
import torch

_constants = {}


def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """A tensor of ``value`` (broadcast to ``shape``), cached so that repeated calls reuse one tensor
    on the device instead of copying it from the CPU each time."""
    value = np.asarray(value)
    shape = tuple(shape) if shape is not None else None
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.device("cpu")
    memory_format = memory_format if memory_format is not None else torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constants.get(key)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor = torch.broadcast_to(tensor, shape)
        tensor = tensor.contiguous(memory_format=memory_format)
        _constants[key] = tensor
    return tensor


@contextlib.contextmanager
def suppress_tracer_warnings():
    """Silences torch.jit.TracerWarning, which converting a traced size to a Python int raises."""
    # A filter added and removed by hand: warnings.catch_warnings would reset the registry of warnings
    # already shown (bpo-29672), so that network code calling this on every forward pass would make
    # unrelated warnings repeat.
    entry = ("ignore", None, torch.jit.TracerWarning, None, 0)
    warnings.filters.insert(0, entry)
    try:
        yield
    finally:
        warnings.filters.remove(entry)


def assert_shape(tensor, ref_shape):
    """Raises AssertionError unless tensor's shape matches ref_shape (None matches any size)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f"Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}")
    for index, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            continue
        if isinstance(size, torch.Tensor) or isinstance(ref_size, torch.Tensor):
            # Sizes are tensors while tracing: assert symbolically so the check survives in the trace.
            with suppress_tracer_warnings():
                torch._assert(torch.equal(torch.as_tensor(size), torch.as_tensor(ref_size)),
                              f"Wrong size for dimension {index}: expected {ref_size}")
        elif size != ref_size:
            raise AssertionError(f"Wrong size for dimension {index}: got {size}, expected {ref_size}")


def profiled_function(fn):
    """Decorator that labels each call of fn in the PyTorch profiler with fn's name."""
    @functools.wraps(fn)
    def labelled(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    return labelled


def named_params_and_buffers(module):
    """[(name, tensor)] for every parameter and then every buffer of module."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copies every parameter and buffer of dst_module that src_module has under the same name
    (every one, or ValueError, if require_all); dst keeps its own requires_grad flags."""
    source = dict(named_params_and_buffers(src_module))
    destination = named_params_and_buffers(dst_module)
    missing = [name for name, _ in destination if name not in source]
    if require_all and missing:
        raise ValueError(f"copy_params_and_buffers: the source module lacks {', '.join(missing)}")
    for name, tensor in destination:
        if name in source:
            tensor.copy_(source[name].detach())
