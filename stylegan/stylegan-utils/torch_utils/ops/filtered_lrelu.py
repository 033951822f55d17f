"""filtered_lrelu: StyleGAN3's alias-suppressing nonlinearity (bias, FIR upsampling, leaky ReLU,
FIR downsampling)."""
import math

from torch_utils.ops import bias_act, check_impl, upfirdn2d
from torch_utils.ops.upfirdn2d import INTEGERS


def filtered_lrelu(x, fu=None, fd=None, b=None, up=1, down=1, padding=0, gain=math.sqrt(2), slope=0.2,
                   clamp=None, flip_filter=False, impl="cuda"):
    """For each channel of x [batch, channels, H, W]:

    1. add the bias b ([channels] or None);
    2. upsample by ``up`` with the filter fu: zero insertion, zero padding by ``padding`` (int,
       [x, y] or [x0, x1, y0, y1], relative to the upsampled image, negative crops), convolution
       with fu scaled by up^2 (valid outputs only);
    3. multiply by ``gain``, apply leaky ReLU with negative slope ``slope``, clip to
       [-clamp, clamp] unless clamp is None;
    4. downsample by ``down`` with the filter fd: convolution (valid outputs only), then keep every
       down-th pixel.

    Filters are [taps] (separable), [height, width] or None (identity); ``flip_filter`` makes them
    correlations instead of convolutions.
    """
    check_impl(impl)
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, channels, height, width], got shape {list(x.shape)}")
    for name, value in (("up", up), ("down", down)):
        if not isinstance(value, INTEGERS) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not gain > 0 or not slope >= 0 or (clamp is not None and not clamp >= 0):
        raise ValueError(f"need gain > 0, slope >= 0 and clamp None or >= 0; got gain={gain}, "
                         f"slope={slope}, clamp={clamp}")

    y = bias_act.bias_act(x, b)
    y = upfirdn2d.upfirdn2d(y, fu, up=up, padding=padding, gain=up ** 2, flip_filter=flip_filter)
    y = bias_act.bias_act(y, act="lrelu", alpha=slope, gain=gain, clamp=clamp)
    y = upfirdn2d.upfirdn2d(y, fd, down=down, flip_filter=flip_filter)
    return y
