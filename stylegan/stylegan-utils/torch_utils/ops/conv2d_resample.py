"""conv2d_resample: a 2-D convolution combined with FIR upsampling and/or downsampling."""
import torch.nn.functional as F

from torch_utils.ops import conv2d_gradfix, upfirdn2d
from torch_utils.ops.upfirdn2d import (INTEGERS, _add_padding, _downsample_padding, _get_filter_size,
                                       _parse_padding, _upsample_padding)


def conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False):
    """For x [batch, in_channels, H, W] and w [out_channels, in_channels // groups, kh, kw], computes

    1. upsampling by ``up`` with the FIR filter f (zero insertion, filter with gain up^2),
    2. the convolution with w: a correlation like torch's conv2d if ``flip_weight``, else a true
       convolution,
    3. downsampling by ``down`` with f (filter, keep every down-th pixel),

    with zero padding applied once, before everything: ``padding`` (int, [x, y] or
    [x0, x1, y0, y1], relative to the upsampled image) plus the padding that makes up/down change
    the size by exactly their factor. f is ignored when up = down = 1.
    """
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"x and w must be 4-D, got shapes {list(x.shape)} and {list(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"w ({w.dtype}) must have x's dtype ({x.dtype})")
    for name, value in (("up", up), ("down", down), ("groups", groups)):
        if not isinstance(value, INTEGERS) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    up, down, groups = int(up), int(down), int(groups)
    fw, fh = _get_filter_size(f)
    padding = list(_parse_padding(padding))
    if up > 1:
        padding = _add_padding(padding, _upsample_padding(fw, fh, up, up))
    if down > 1:
        padding = _add_padding(padding, _downsample_padding(fw, fh, down, down))

    if up > 1:
        x = _upsampling_convolution(x, w, up, groups, flip_weight)
        # The transposed convolution's full output starts kw - 1 samples before the padded image's
        # first valid output and ends up - 1 samples short of the zero-inserted image's end.
        _, _, kh, kw = w.shape
        padding = _add_padding(padding, [-(kw - 1), -(kw - up), -(kh - 1), -(kh - up)])
        x = upfirdn2d.upfirdn2d(x, f, padding=padding, gain=up ** 2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d.upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x

    # Filtering before the convolution equals filtering after it (both are linear and shift-invariant),
    # and lets the convolution keep only every down-th output through its stride.
    if down > 1:
        x = upfirdn2d.upfirdn2d(x, f, padding=padding, flip_filter=flip_filter)
    else:
        x = F.pad(x, padding)
    weight = w if flip_weight else w.flip([2, 3])  # conv2d correlates
    return conv2d_gradfix.conv2d(x, weight, stride=down, groups=groups)


def _upsampling_convolution(x, w, up, groups, flip_weight):
    """Zero insertion by ``up`` followed by a full convolution with w, as one transposed convolution."""
    out_channels, in_per_group, kh, kw = w.shape
    # conv_transpose2d takes weights as [in_channels, out_channels // groups, kh, kw].
    weight = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    weight = weight.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    if flip_weight:  # conv_transpose2d truly convolves; a correlation with w is a convolution with w flipped
        weight = weight.flip([2, 3])
    return conv2d_gradfix.conv_transpose2d(x, weight, stride=up, groups=groups)
