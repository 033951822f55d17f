"""The ops in stylegan/stylegan-utils/torch_utils against direct reference computations: NumPy/SciPy
zero insertion + convolution + striding, explicit activation formulas, and PyTorch's own pooling
and nearest-neighbour resampling where a filter makes the op equal to one of them."""
import math
import warnings

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

import generator_io

generator_io.add_stylegan_utils_to_path()

from torch_utils import misc  # noqa: E402
from torch_utils.ops import (  # noqa: E402
    bias_act,
    conv2d_gradfix,
    conv2d_resample,
    filtered_lrelu,
    fma,
    grid_sample_gradfix,
    upfirdn2d,
)

# ---- references ------------------------------------------------------------------------------

def reference_upfirdn2d(x, f, up=(1, 1), down=(1, 1), padding=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    """NumPy/SciPy: insert zeros, pad or crop, convolve ('valid'), keep every down-th pixel.
    x: [B, C, H, W] array; f: 2-D array (a separable filter is passed as its outer product)."""
    (upx, upy), (downx, downy), (x0, x1, y0, y1) = up, down, padding
    batch, channels, height, width = x.shape
    upsampled = np.zeros((batch, channels, height * upy, width * upx))
    upsampled[:, :, ::upy, ::upx] = x
    padded = np.pad(upsampled, ((0, 0), (0, 0), (max(y0, 0), max(y1, 0)), (max(x0, 0), max(x1, 0))))
    padded = padded[:, :, max(-y0, 0):padded.shape[2] - max(-y1, 0), max(-x0, 0):padded.shape[3] - max(-x1, 0)]
    operation = scipy.signal.correlate2d if flip_filter else scipy.signal.convolve2d
    out = np.stack([np.stack([operation(image, f * gain, mode="valid") for image in sample]) for sample in padded])
    return out[:, :, ::downy, ::downx]


def reference_conv(x, w, groups=1, flip_weight=True):
    """NumPy/SciPy grouped 'valid' convolution: correlation with w if flip_weight, else convolution."""
    out_channels, in_per_group = w.shape[:2]
    operation = scipy.signal.correlate2d if flip_weight else scipy.signal.convolve2d
    per_group = out_channels // groups
    return np.stack([np.stack([
        sum(operation(sample[(o // per_group) * in_per_group + i], w[o, i], mode="valid") for i in range(in_per_group))
        for o in range(out_channels)]) for sample in x])


def as_2d(f):
    f = f.double().numpy()
    return np.outer(f, f) if f.ndim == 1 else f


def random_case(seed):
    rng = np.random.default_rng(seed)
    separable = bool(rng.integers(2))
    taps = int(rng.integers(1, 6))
    f = rng.uniform(0.1, 1, taps) if separable else rng.uniform(-1, 1, tuple(rng.integers(1, 6, 2)))
    return dict(x=rng.standard_normal((2, 3, *rng.integers(3, 8, 2))), f=f,
                up=tuple(int(u) for u in rng.integers(1, 4, 2)), down=tuple(int(d) for d in rng.integers(1, 4, 2)),
                padding=tuple(int(p) for p in rng.integers(-2, 5, 4)), flip_filter=bool(rng.integers(2)),
                gain=float(rng.uniform(0.5, 3)))


# ---- upfirdn2d -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_upfirdn2d_matches_zero_insertion_convolution_and_striding(seed):
    case = random_case(seed)
    f = torch.tensor(case["f"], dtype=torch.float32)
    height, width = case["x"].shape[2:]
    if (width * case["up"][0] + sum(case["padding"][:2]) < f.shape[-1]
            or height * case["up"][1] + sum(case["padding"][2:]) < f.shape[0]):
        with pytest.raises(ValueError, match="smaller than the filter"):
            upfirdn2d.upfirdn2d(torch.tensor(case["x"]), f, up=list(case["up"]), padding=list(case["padding"]))
        return
    out = upfirdn2d.upfirdn2d(torch.tensor(case["x"]), f, up=list(case["up"]), down=list(case["down"]),
                              padding=list(case["padding"]), flip_filter=case["flip_filter"], gain=case["gain"])
    expected = reference_upfirdn2d(case["x"], as_2d(f), case["up"], case["down"], case["padding"],
                                   case["flip_filter"], case["gain"])
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_upfirdn2d_scalar_arguments_and_identity_filter():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    f = torch.tensor([1.0, 2.0, 1.0])
    out = upfirdn2d.upfirdn2d(x, f, up=2, down=3, padding=1)
    expected = reference_upfirdn2d(x.numpy(), as_2d(f), (2, 2), (3, 3), (1, 1, 1, 1))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    # [x, y] padding means [x, x, y, y]; f=None is a 1x1 identity filter; np.int64 values are accepted.
    out = upfirdn2d.upfirdn2d(x, None, padding=[np.int64(2), -1], gain=3)
    assert torch.equal(out, 3 * F.pad(x, [2, 2, -1, -1]))


def test_upfirdn2d_rejects_bad_arguments():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="up/down"):
        upfirdn2d.upfirdn2d(x, None, up=0)
    with pytest.raises(ValueError, match="padding"):
        upfirdn2d.upfirdn2d(x, None, padding=[1, 2, 3])
    with pytest.raises(ValueError, match="impl"):
        upfirdn2d.upfirdn2d(x, None, impl="fast")


def test_setup_filter_shapes_normalisation_flip_and_gain():
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    assert f.dtype == torch.float32 and f.shape == (4, 4)
    assert torch.allclose(f, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    assert upfirdn2d.setup_filter(list(range(1, 9))).shape == (8,)  # 8+ taps: separable by default
    assert upfirdn2d.setup_filter([1, 2], separable=True).shape == (2,)
    assert upfirdn2d.setup_filter(list(range(1, 9)), separable=False).shape == (8, 8)
    assert torch.equal(upfirdn2d.setup_filter(None), torch.ones(1, 1))
    assert torch.allclose(upfirdn2d.setup_filter([1, 2], normalize=False, flip_filter=True),
                          torch.tensor([[4., 2], [2, 1]]))
    assert torch.allclose(upfirdn2d.setup_filter([1, 1], gain=4).sum(), torch.tensor(4.))  # 2-D: gain
    assert torch.allclose(upfirdn2d.setup_filter([1, 1], gain=4, separable=True).sum(), torch.tensor(2.))  # sqrt(gain)
    with pytest.raises(ValueError, match="separable"):
        upfirdn2d.setup_filter([[1, 2], [3, 4]], separable=True)


def test_resampling_shorthands_equal_nearest_neighbour_and_box_pooling():
    # With the 2-tap box filter, FIR upsampling by 2 is nearest-neighbour repetition and FIR
    # downsampling by 2 is 2x2 average pooling: this pins down the shorthands' centring padding.
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    box = upfirdn2d.setup_filter([1, 1])
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.allclose(upfirdn2d.upsample2d(x, box), nearest)
    assert torch.allclose(upfirdn2d.downsample2d(x, box), F.avg_pool2d(x, 2))
    assert torch.allclose(upfirdn2d.upsample2d(x, upfirdn2d.setup_filter([1, 1, 1]), up=3),
                          x.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3))
    blur = upfirdn2d.setup_filter([1, 2, 1])
    expected = F.conv2d(x.reshape(6, 1, 6, 8), blur.double()[None, None], padding=1).reshape(2, 3, 6, 8)
    assert torch.allclose(upfirdn2d.filter2d(x, blur), expected)
    assert upfirdn2d.filter2d(x, blur, padding=[1, -1]).shape == (2, 3, 4, 10)  # extra padding on top


def test_standard_resampling_filter_keeps_constant_images_constant_inside():
    x = torch.full((1, 1, 8, 8), 2.5)
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    up = upfirdn2d.upsample2d(x, f)
    down = upfirdn2d.downsample2d(x, f)
    assert up.shape == (1, 1, 16, 16) and down.shape == (1, 1, 4, 4)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.tensor(2.5))
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.tensor(2.5))


# ---- bias_act --------------------------------------------------------------------------------

ACTIVATIONS = {
    "linear": lambda x, alpha: x,
    "relu": lambda x, alpha: np.maximum(x, 0),
    "lrelu": lambda x, alpha: np.where(x > 0, x, alpha * x),
    "tanh": lambda x, alpha: np.tanh(x),
    "sigmoid": lambda x, alpha: 1 / (1 + np.exp(-x)),
    "elu": lambda x, alpha: np.where(x > 0, x, np.expm1(x)),
    "selu": lambda x, alpha: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
    "softplus": lambda x, alpha: np.log1p(np.exp(x)),
    "swish": lambda x, alpha: x / (1 + np.exp(-x)),
}
DEFAULT_GAINS = {"relu": math.sqrt(2), "lrelu": math.sqrt(2), "swish": math.sqrt(2)}


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_bias_act_each_activation_with_bias_gain_and_clamp(act):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3)) * 3
    b = rng.standard_normal(5)
    spec = bias_act.activation_funcs[act]
    assert spec.def_gain == pytest.approx(DEFAULT_GAINS.get(act, 1))
    assert spec.def_alpha == (0.2 if act == "lrelu" else 0)
    assert {"func", "cuda_idx", "ref", "has_2nd_grad"} <= set(spec)
    # Defaults: bias along dim 1, the activation's default alpha and gain, no clamp.
    out = bias_act.bias_act(torch.tensor(x), torch.tensor(b), act=act)
    expected = ACTIVATIONS[act](x + b[None, :, None], spec.def_alpha) * spec.def_gain
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    # Explicit alpha, gain and clamp, bias along the last dimension.
    b_last = rng.standard_normal(3)
    out = bias_act.bias_act(torch.tensor(x), torch.tensor(b_last), dim=2, act=act, alpha=0.1, gain=2.5, clamp=1.5)
    expected = np.clip(ACTIVATIONS[act](x + b_last, 0.1) * 2.5, -1.5, 1.5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert out.abs().max() <= 1.5


def test_bias_act_without_bias_and_argument_checks():
    x = torch.randn(4, 3)
    assert torch.equal(bias_act.bias_act(x), x)
    assert torch.allclose(bias_act.bias_act(x, act="relu", gain=1), x.clamp(min=0))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        bias_act.bias_act(x, act="gelu")
    with pytest.raises(ValueError, match="1-D tensor as long as x.shape"):
        bias_act.bias_act(x, torch.zeros(4))
    with pytest.raises(ValueError, match="clamp"):
        bias_act.bias_act(x, clamp=-1)


# ---- filtered_lrelu ---------------------------------------------------------------------------

FILTERED_LRELU_CASES = [
    # up, down, fu taps (0: None, >0: separable, <0: 2-D), fd taps, padding, gain, slope, clamp, flip
    (2, 2, 8, 8, [7, 6, 7, 6], math.sqrt(2), 0.2, None, False),
    (1, 2, 0, 6, 2, 1.0, 0.2, 0.5, False),
    (4, 1, 12, 0, [5, 6, 4, 7], 2.0, 0.0, 1.0, True),
    (2, 1, -4, -3, [-1, 2, 1, 0], 1.0, 1.0, None, False),  # slope 1: StyleGAN3's toRGB (no nonlinearity)
    (1, 1, 0, 0, 0, math.sqrt(2), 0.2, 0.3, False),
]


def make_filter(taps, rng):
    if taps == 0:
        return None
    shape = (taps,) if taps > 0 else (-taps, -taps + 1)
    return torch.tensor(rng.uniform(0.1, 1, shape), dtype=torch.float32)


@pytest.mark.parametrize("up, down, fu_taps, fd_taps, padding, gain, slope, clamp, flip", FILTERED_LRELU_CASES)
def test_filtered_lrelu_is_bias_upsampling_leaky_relu_clamp_and_downsampling(up, down, fu_taps, fd_taps, padding,
                                                                            gain, slope, clamp, flip):
    rng = np.random.default_rng(up * 10 + down)
    x = rng.standard_normal((2, 3, 6, 5)) * 2
    b = rng.standard_normal(3)
    fu, fd = make_filter(fu_taps, rng), make_filter(fd_taps, rng)
    out = filtered_lrelu.filtered_lrelu(torch.tensor(x), fu=fu, fd=fd, b=torch.tensor(b), up=up, down=down,
                                        padding=padding, gain=gain, slope=slope, clamp=clamp, flip_filter=flip)
    pads = [padding] * 4 if isinstance(padding, int) else padding
    ones = np.ones((1, 1))
    y = reference_upfirdn2d(x + b[None, :, None, None], ones if fu is None else as_2d(fu), (up, up), (1, 1), pads,
                            flip, gain=up ** 2)
    y = np.where(y > 0, y, slope * y) * gain
    if clamp is not None:
        y = np.clip(y, -clamp, clamp)
    y = reference_upfirdn2d(y, ones if fd is None else as_2d(fd), (1, 1), (down, down), (0, 0, 0, 0), flip)
    assert out.shape == y.shape
    np.testing.assert_allclose(out.numpy(), y, rtol=1e-6, atol=1e-6)


def test_filtered_lrelu_default_gain_and_slope():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    assert torch.allclose(filtered_lrelu.filtered_lrelu(x), F.leaky_relu(x, 0.2) * math.sqrt(2))
    with pytest.raises(ValueError, match="slope >= 0"):
        filtered_lrelu.filtered_lrelu(x, slope=-0.1)


# ---- conv2d_resample -------------------------------------------------------------------------

CONV_CASES = [
    # kernel, up, down, groups, filter taps, padding, flip_weight, flip_filter
    (3, 2, 1, 1, [1, 3, 3, 1], 1, False, False),  # StyleGAN2's upsampling convolution
    (3, 1, 2, 1, [1, 3, 3, 1], 1, True, False),  # StyleGAN2's discriminator
    (1, 2, 1, 1, [1, 3, 3, 1], 0, True, False),  # 1x1 with upsampling (skip connections)
    (1, 1, 2, 2, [1, 2, 1], 0, True, True),
    (3, 2, 2, 2, [1, 2, 3], [1, 0, 2, 1], False, True),
    (2, 3, 1, 1, [1, 1, 1], [0, 1], True, False),
    (3, 1, 1, 2, None, [2, 0, 1, -1], False, False),
    (3, 1, 1, 1, None, 1, True, False),
]


@pytest.mark.parametrize("kernel, up, down, groups, taps, padding, flip_weight, flip_filter", CONV_CASES)
def test_conv2d_resample_is_upsampling_convolution_and_downsampling(kernel, up, down, groups, taps, padding,
                                                                    flip_weight, flip_filter):
    rng = np.random.default_rng(kernel + 10 * up + 100 * down)
    x = rng.standard_normal((2, 2 * groups, 5, 6))
    w = rng.standard_normal((3 * groups, 2, kernel, kernel))
    f = upfirdn2d.setup_filter(taps) if taps is not None else None
    out = conv2d_resample.conv2d_resample(torch.tensor(x), torch.tensor(w), f=f, up=up, down=down, padding=padding,
                                          groups=groups, flip_weight=flip_weight, flip_filter=flip_filter)
    # The documented composition: padding (user's + the up/down centring padding of upsample2d and
    # downsample2d) applied once, FIR upsampling, the convolution, FIR downsampling.
    pads = list(upfirdn2d._parse_padding(padding))
    fw = 1 if f is None else f.shape[-1]
    if up > 1:
        pads = [p + q for p, q in zip(pads, [(fw + up - 1) // 2, (fw - up) // 2] * 2)]
    if down > 1:
        pads = [p + q for p, q in zip(pads, [(fw - down + 1) // 2, (fw - down) // 2] * 2)]
    f2 = np.ones((1, 1)) if f is None or up == 1 else as_2d(f)
    y = reference_upfirdn2d(x, f2, (up, up), (1, 1), pads, flip_filter, gain=up ** 2)
    y = reference_conv(y, w, groups, flip_weight)
    if down > 1:
        y = reference_upfirdn2d(y, as_2d(f), (1, 1), (down, down), (0, 0, 0, 0), flip_filter)
    assert out.shape == y.shape
    np.testing.assert_allclose(out.numpy(), y, rtol=1e-6, atol=1e-6)


def test_conv2d_resample_with_box_filter_equals_nearest_upsampling_and_average_pooling():
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    box = upfirdn2d.setup_filter([1, 1])
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    up = conv2d_resample.conv2d_resample(x, w, f=box, up=2, padding=1)
    assert torch.allclose(up, F.conv2d(nearest, w, padding=1))
    down = conv2d_resample.conv2d_resample(x[..., :4, :6], w, f=box, down=2, padding=1, flip_weight=False)
    assert torch.allclose(down, F.avg_pool2d(F.conv2d(x[..., :4, :6], w.flip([2, 3]), padding=1), 2))


def test_conv2d_resample_rejects_mismatched_dtypes():
    with pytest.raises(TypeError, match="dtype"):
        conv2d_resample.conv2d_resample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="up must be an int >= 1"):
        conv2d_resample.conv2d_resample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3), up=0)


# ---- conv2d_gradfix, fma, grid_sample_gradfix ------------------------------------------------

def test_conv2d_gradfix_accepts_the_keywords_network_code_passes():
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3), torch.randn(6)
    assert torch.allclose(conv2d_gradfix.conv2d(input=x, weight=w, bias=b, padding=1, groups=2),
                          F.conv2d(x, w, b, padding=1, groups=2))
    wt = torch.randn(4, 3, 3, 3)
    assert torch.allclose(conv2d_gradfix.conv_transpose2d(input=x, weight=wt, stride=2, padding=1, output_padding=1),
                          F.conv_transpose2d(x, wt, stride=2, padding=1, output_padding=1))


def test_fma_broadcasts_like_multiply_add():
    a, b, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 1, 1), torch.randn(2, 1, 4, 4)
    assert torch.allclose(fma.fma(a, b, c), a * b + c)
    assert fma.fma(torch.randn(3, 1), torch.randn(1, 4), torch.randn(1)).shape == (3, 4)


def test_grid_sample_samples_pixel_centres_bilinearly_with_zero_padding():
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    identity = F.affine_grid(torch.eye(2, 3, dtype=torch.float64)[None], [1, 2, 4, 5], align_corners=False)
    assert torch.allclose(grid_sample_gradfix.grid_sample(x, identity), x)
    half_pixel = identity.clone()
    half_pixel[..., 0] += 1 / 5  # half a pixel to the right (the width spans 2 units over 5 pixels)
    shifted = grid_sample_gradfix.grid_sample(x, half_pixel)
    assert torch.allclose(shifted[..., :-1], (x[..., :-1] + x[..., 1:]) / 2)
    assert torch.allclose(shifted[..., -1], x[..., -1] / 2)  # the right neighbour is outside: zero


# ---- gradients -------------------------------------------------------------------------------

def test_gradients_of_every_op_match_finite_differences():
    torch.manual_seed(0)
    double = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 2, 5, 5, **double)
    b = torch.randn(2, **double)
    w = torch.randn(3, 2, 3, 3, **double)
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    lowpass = upfirdn2d.setup_filter(np.hanning(8)[1:-1], separable=True)
    checks = {
        "bias_act tanh": (lambda x, b: bias_act.bias_act(x, b, act="tanh", gain=2.0), (x, b)),
        "bias_act lrelu clamp": (lambda x, b: bias_act.bias_act(x, b, act="lrelu", clamp=0.8), (x, b)),
        "upfirdn2d": (lambda x: upfirdn2d.upfirdn2d(x, f, up=2, down=2, padding=[2, 1, 1, 2]), (x,)),
        "upsample2d": (lambda x: upfirdn2d.upsample2d(x, lowpass), (x,)),
        "conv2d_resample up": (lambda x, w: conv2d_resample.conv2d_resample(x, w, f, up=2, padding=1), (x, w)),
        "conv2d_resample down": (lambda x, w: conv2d_resample.conv2d_resample(x, w, f, down=2, padding=1), (x, w)),
        "filtered_lrelu": (lambda x, b: filtered_lrelu.filtered_lrelu(x, lowpass, lowpass, b, up=2, down=2,
                                                                     padding=5, clamp=1.0), (x, b)),
        "fma": (lambda x, b: fma.fma(x, b.reshape(1, 2, 1, 1), x.square()), (x, b)),
    }
    # fast_mode compares random projections of the Jacobians: as exacting for a wrong gradient, far cheaper.
    for name, (function, inputs) in checks.items():
        assert torch.autograd.gradcheck(function, inputs, fast_mode=True), name
    # Second-order gradients (e.g. the R1 penalty of a discriminator) through the resampling ops.
    for name in ("conv2d_resample up", "conv2d_resample down", "filtered_lrelu", "bias_act tanh"):
        function, inputs = checks[name]
        assert torch.autograd.gradgradcheck(function, inputs, fast_mode=True), name


# ---- misc ------------------------------------------------------------------------------------

def test_assert_shape_accepts_matches_and_names_the_mismatch():
    t = torch.zeros(2, 3, 4)
    misc.assert_shape(t, [2, None, 4])
    with pytest.raises(AssertionError, match="Wrong number of dimensions: got 3, expected 2"):
        misc.assert_shape(t, [2, 3])
    with pytest.raises(AssertionError, match="Wrong size for dimension 1: got 3, expected 5"):
        misc.assert_shape(t, [2, 5, 4])


def test_suppress_tracer_warnings_silences_only_tracer_warnings_and_only_inside():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with misc.suppress_tracer_warnings():
            warnings.warn("traced", torch.jit.TracerWarning)
            warnings.warn("other", UserWarning)
        warnings.warn("traced again", torch.jit.TracerWarning)
    assert [str(w.message) for w in caught] == ["other", "traced again"]


def test_suppress_tracer_warnings_does_not_make_other_warnings_repeat():
    def warn_once_per_place():
        warnings.warn("shown once", UserWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # show each warning once per place in the code
        for _ in range(3):  # network code enters the context on every forward pass
            warn_once_per_place()
            with misc.suppress_tracer_warnings():
                pass
    assert [str(w.message) for w in caught] == ["shown once"]


def test_profiled_function_keeps_name_and_result_and_labels_the_profile():
    @misc.profiled_function
    def scaled_sum(x, factor=2):
        return x.sum() * factor

    assert scaled_sum.__name__ == "scaled_sum"
    with torch.autograd.profiler.profile() as profile:
        assert scaled_sum(torch.ones(3), factor=3).item() == 9
    assert "scaled_sum" in {event.name for event in profile.function_events}


def test_copy_params_and_buffers():
    torch.manual_seed(0)
    source, target = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    source.weight.data.normal_()
    source.running_mean.normal_()
    target.weight.requires_grad_(False)
    misc.copy_params_and_buffers(source, target, require_all=True)
    assert torch.equal(target.weight, source.weight) and torch.equal(target.running_mean, source.running_mean)
    assert not target.weight.requires_grad and target.bias.requires_grad  # target keeps its own flags
    bigger = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="lacks 0.weight, 0.bias"):
        misc.copy_params_and_buffers(source, bigger, require_all=True)
    misc.copy_params_and_buffers(source, bigger)  # without require_all, unmatched names are skipped
    assert not torch.equal(bigger[0].weight, source.weight)


def test_constant_is_cached_broadcast_and_typed():
    a = misc.constant([1, 2], shape=[3, 2], dtype=torch.float64)
    assert a.shape == (3, 2) and a.dtype == torch.float64 and a.is_contiguous()
    assert torch.equal(a, torch.tensor([[1., 2]] * 3, dtype=torch.float64))
    assert misc.constant([1, 2], shape=[3, 2], dtype=torch.float64) is a
    assert misc.constant([1, 3], shape=[3, 2], dtype=torch.float64) is not a
    assert misc.constant(0.5).dtype == torch.get_default_dtype()
