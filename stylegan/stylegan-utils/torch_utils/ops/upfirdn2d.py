"""upfirdn2d: upsample, pad, FIR-filter and downsample a batch of 2-D images (each channel on its
own), and its shorthands setup_filter, filter2d, upsample2d and downsample2d."""
import numpy as np
import torch
import torch.nn.functional as F

from torch_utils.ops import check_impl

INTEGERS = (int, np.integer)  # network code computes some paddings with NumPy


def _parse_scaling(scaling):
    """int or [x, y] -> (x, y), each >= 1."""
    if isinstance(scaling, INTEGERS):
        scaling = [scaling, scaling]
    if (not isinstance(scaling, (list, tuple)) or len(scaling) != 2
            or not all(isinstance(s, INTEGERS) and s >= 1 for s in scaling)):
        raise ValueError(f"up/down must be an int >= 1 or a pair [x, y] of them, got {scaling!r}")
    return int(scaling[0]), int(scaling[1])


def _parse_padding(padding):
    """int, [x, y] or [x_before, x_after, y_before, y_after] -> (x0, x1, y0, y1)."""
    if isinstance(padding, INTEGERS):
        padding = [padding, padding]
    if (not isinstance(padding, (list, tuple)) or len(padding) not in (2, 4)
            or not all(isinstance(p, INTEGERS) for p in padding)):
        raise ValueError(f"padding must be an int, [x, y] or [x0, x1, y0, y1], got {padding!r}")
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        padding = [padding[0], padding[0], padding[1], padding[1]]
    return tuple(padding)


def _get_filter_size(f):
    """(width, height) of a filter of shape [taps] (separable), [height, width], or None (1x1)."""
    if f is None:
        return 1, 1
    if not isinstance(f, torch.Tensor) or f.ndim not in (1, 2):
        raise ValueError("a filter must be None or a tensor of shape [taps] or [height, width]")
    return int(f.shape[-1]), int(f.shape[0])


def _upsample_padding(fw, fh, upx, upy):
    """Padding that makes upsampling by (upx, upy) with a fw x fh filter give exactly up times the
    input size, with the filter centred on the input samples."""
    return [(fw + upx - 1) // 2, (fw - upx) // 2, (fh + upy - 1) // 2, (fh - upy) // 2]


def _downsample_padding(fw, fh, downx, downy):
    """Padding that makes downsampling by (downx, downy) with a fw x fh filter give exactly the input
    size divided by down; with down = 1 it keeps the size (a centred 'same' filter)."""
    return [(fw - downx + 1) // 2, (fw - downx) // 2, (fh - downy + 1) // 2, (fh - downy) // 2]


def _add_padding(padding, extra):
    return [a + b for a, b in zip(padding, extra)]


def setup_filter(f, device=torch.device("cpu"), normalize=True, flip_filter=False, gain=1, separable=None):
    """A float32 FIR filter for upfirdn2d from a list, array or tensor.

    f of shape [] or [taps] stays 1-D (separable: applied along x, then along y) if ``separable`` is
    True, or by default when it has at least 8 taps; otherwise it becomes the outer product
    [taps, taps]; f of shape [height, width] is used as is, and None is the identity. ``normalize``
    scales the taps to sum to 1 (DC gain 1), ``flip_filter`` reverses them, and ``gain`` scales the
    2-D response (so each pass of a separable filter by sqrt(gain)).
    """
    f = torch.as_tensor(1 if f is None else f, dtype=torch.float32)
    if f.ndim > 2 or f.numel() == 0:
        raise ValueError(f"a filter needs shape [], [taps] or [height, width] with at least one tap, "
                         f"got {list(f.shape)}")
    f = f.reshape(1) if f.ndim == 0 else f
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if separable and f.ndim != 1:
        raise ValueError("only a 1-D filter can be separable")
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    return (f * gain ** (f.ndim / 2)).to(device)


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, impl="cuda"):
    """For each channel of x [batch, channels, height, width]:

    1. upsample by inserting up - 1 zeros after each pixel (``up``: int or [x, y]);
    2. pad with zeros (``padding``: int, [x, y] or [x0, x1, y0, y1], relative to the upsampled
       image; negative values crop);
    3. convolve with the FIR filter f ([taps]: separable, [height, width], or None: identity),
       keeping only outputs whose footprint lies inside the padded image; ``flip_filter=False``
       is a true convolution, True a correlation; the filter is scaled so its 2-D gain is ``gain``;
    4. downsample by keeping every down-th pixel (``down``: int or [x, y]).
    """
    check_impl(impl)
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError("x must be a tensor of shape [batch, channels, height, width]")
    upx, upy = _parse_scaling(up)
    downx, downy = _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    padded_width = x.shape[3] * upx + padx0 + padx1
    padded_height = x.shape[2] * upy + pady0 + pady1
    if padded_width < fw or padded_height < fh:
        raise ValueError(f"the upsampled, padded image ({padded_width}x{padded_height}) is smaller than "
                         f"the filter ({fw}x{fh})")
    if f is None:
        f = torch.ones([1, 1], device=x.device)
    # `kernel` is what the image is truly convolved with: a correlation with f is a convolution with f flipped.
    kernel = f.to(device=x.device, dtype=x.dtype) * gain ** (f.ndim / 2)
    if flip_filter:
        kernel = kernel.flip(list(range(kernel.ndim)))
    if kernel.ndim == 2:
        return _upfirdn_pass(x, kernel, upx, upy, downx, downy, [padx0, padx1, pady0, pady1])
    x = _upfirdn_pass(x, kernel.unsqueeze(0), upx, 1, downx, 1, [padx0, padx1, 0, 0])  # along x
    return _upfirdn_pass(x, kernel.unsqueeze(1), 1, upy, 1, downy, [0, 0, pady0, pady1])  # along y


def _upfirdn_pass(x, kernel, upx, upy, downx, downy, padding):
    """upfirdn2d with a 2-D kernel [kh, kw] to convolve with (not correlate)."""
    batch, channels, height, width = x.shape
    kh, kw = kernel.shape
    padx0, padx1, pady0, pady1 = padding
    images = x.reshape(batch * channels, 1, height, width)
    weight = kernel.reshape(1, 1, kh, kw)
    if upx > 1 or upy > 1:
        # conv_transpose2d with stride `up` is zero insertion followed by a full convolution, without
        # multiplying the inserted zeros. The full convolution starts k - 1 samples before the first
        # output of a valid convolution of the unpadded image, and ends up - 1 samples short of the
        # zero-inserted image's end: shift the requested padding by those amounts.
        images = F.conv_transpose2d(images, weight, stride=(upy, upx))
        images = F.pad(images, [padx0 - (kw - 1), padx1 - (kw - upx), pady0 - (kh - 1), pady1 - (kh - upy)])
        images = images[:, :, ::downy, ::downx]
    else:
        images = F.pad(images, [padx0, padx1, pady0, pady1])
        # conv2d correlates, so the kernel is flipped; the stride keeps every down-th output.
        images = F.conv2d(images, weight.flip([2, 3]), stride=(downy, downx))
    return images.reshape(batch, channels, images.shape[2], images.shape[3])


def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl="cuda"):
    """Filters x with f, padded so the output has x's size; ``padding`` adds to that (negative crops)."""
    fw, fh = _get_filter_size(f)
    padding = _add_padding(_parse_padding(padding), _downsample_padding(fw, fh, 1, 1))
    return upfirdn2d(x, f, padding=padding, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl="cuda"):
    """Upsamples x by ``up`` with the filter f, to exactly up times x's size (``padding`` adds to
    that); the gain is multiplied by up_x * up_y so the inserted zeros keep the signal's level."""
    upx, upy = _parse_scaling(up)
    fw, fh = _get_filter_size(f)
    padding = _add_padding(_parse_padding(padding), _upsample_padding(fw, fh, upx, upy))
    return upfirdn2d(x, f, up=up, padding=padding, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl="cuda"):
    """Downsamples x by ``down`` with the filter f, to exactly x's size divided by down (``padding``,
    relative to the input, adds to that)."""
    downx, downy = _parse_scaling(down)
    fw, fh = _get_filter_size(f)
    padding = _add_padding(_parse_padding(padding), _downsample_padding(fw, fh, downx, downy))
    return upfirdn2d(x, f, down=down, padding=padding, flip_filter=flip_filter, gain=gain, impl=impl)
