"""bias_act: add a bias, apply an activation function, scale by a gain, clamp."""
import math

import torch
import torch.nn.functional as F

from dnnlib import EasyDict
from torch_utils.ops import check_impl

SQRT2 = math.sqrt(2)

# The activations NVIDIA's networks name, with their default alpha and gain. cuda_idx, ref
# ('x'/'y': whether the gradient is computed from the input or the output) and has_2nd_grad describe
# NVIDIA's fused kernel; they are kept because code reads this table, and are unused here.
activation_funcs = {
    "linear": EasyDict(func=lambda x, **_: x,
                       def_alpha=0, def_gain=1, cuda_idx=1, ref="", has_2nd_grad=False),
    "relu": EasyDict(func=lambda x, **_: F.relu(x),
                     def_alpha=0, def_gain=SQRT2, cuda_idx=2, ref="y", has_2nd_grad=False),
    "lrelu": EasyDict(func=lambda x, alpha, **_: F.leaky_relu(x, alpha),
                      def_alpha=0.2, def_gain=SQRT2, cuda_idx=3, ref="y", has_2nd_grad=False),
    "tanh": EasyDict(func=lambda x, **_: torch.tanh(x),
                     def_alpha=0, def_gain=1, cuda_idx=4, ref="y", has_2nd_grad=True),
    "sigmoid": EasyDict(func=lambda x, **_: torch.sigmoid(x),
                        def_alpha=0, def_gain=1, cuda_idx=5, ref="y", has_2nd_grad=True),
    "elu": EasyDict(func=lambda x, **_: F.elu(x),
                    def_alpha=0, def_gain=1, cuda_idx=6, ref="y", has_2nd_grad=True),
    "selu": EasyDict(func=lambda x, **_: F.selu(x),
                     def_alpha=0, def_gain=1, cuda_idx=7, ref="y", has_2nd_grad=True),
    "softplus": EasyDict(func=lambda x, **_: F.softplus(x),
                         def_alpha=0, def_gain=1, cuda_idx=8, ref="y", has_2nd_grad=True),
    "swish": EasyDict(func=lambda x, **_: torch.sigmoid(x) * x,
                      def_alpha=0, def_gain=SQRT2, cuda_idx=9, ref="x", has_2nd_grad=True),
}


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None, impl="cuda"):
    """Returns clamp(act(x + b, alpha) * gain) in x's shape and dtype.

    b: 1-D bias (or None) added along dimension ``dim`` of x; act: a key of ``activation_funcs``;
    alpha, gain: the activation's shape parameter and output scale, None for the activation's
    defaults; clamp: clip the result to [-clamp, clamp], None for no clipping.
    """
    check_impl(impl)
    if act not in activation_funcs:
        raise ValueError(f"unknown activation {act!r}; choose one of {sorted(activation_funcs)}")
    if clamp is not None and clamp < 0:
        raise ValueError(f"clamp must be None or >= 0, got {clamp}")
    spec = activation_funcs[act]
    alpha = float(alpha if alpha is not None else spec.def_alpha)
    gain = float(gain if gain is not None else spec.def_gain)
    if b is not None:
        if b.ndim != 1 or not 0 <= dim < x.ndim or b.shape[0] != x.shape[dim]:
            raise ValueError(f"b must be a 1-D tensor as long as x.shape[dim]; got b of shape "
                             f"{list(b.shape)}, x of shape {list(x.shape)} and dim={dim}")
        x = x + b.reshape([-1 if axis == dim else 1 for axis in range(x.ndim)])
    x = spec.func(x, alpha=alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-float(clamp), float(clamp))
    return x
