"""A compact StyleGAN2-style generator exposing the interface of NVIDIA's StyleGAN generators.

FedKTL's server only needs ``G.mapping``, ``G.synthesis`` and a few attributes, so this light,
randomly initialised network lets the server run offline on CPU; a pre-trained NVIDIA pickle can
replace it without changing the calling code.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the second moment of unit-variance inputs at about 1
MAPPING_LR_MULTIPLIER = 0.01  # as NVIDIA's: the mapping trains 100x slower than synthesis
W_AVG_SAMPLES = 4096
W_AVG_BETA = 0.998
# NVIDIA starts the noise strengths at 0 and learns them; an untrained generator needs a
# non-zero value for the noise modes to make any difference.
NOISE_STRENGTH_INIT = 0.1
# Scale of the initial toRGB kernels, shared out over the blocks whose outputs are summed, so an
# untrained generator's images have a standard deviation of about 0.3-0.4: mostly inside NVIDIA's
# [-1, 1] output range.
TO_RGB_INIT_GAIN = 0.4
MIN_RESOLUTION = 8
NOISE_MODES = ("const", "random", "none")


def normalize_2nd_moment(x, eps=1e-8):
    """Scales each row of x to unit mean square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def upsample2x(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def modulated_conv2d(x, weight, styles, demodulate=True):
    """Convolves each sample with its own style-scaled kernel, all in one grouped convolution.

    x [B, in, H, W], weight [out, in, k, k], styles [B, in] -> [B, out, H, W]. Demodulation
    rescales every output channel's kernel to unit norm, which keeps activations at unit scale.
    """
    batch, in_channels, height, width = x.shape
    out_channels, _, kernel_size, _ = weight.shape
    scales = styles.unsqueeze(1)  # [B, 1, in]
    if demodulate:
        # Norm of each modulated kernel, from [B, in] x [in, out] rather than the [B, out, in, k, k]
        # kernels themselves, so the large tensor is built by a single multiplication.
        squared_norms = styles.square() @ weight.square().sum(dim=[2, 3]).t()
        scales = scales * (squared_norms + 1e-8).rsqrt().unsqueeze(2)  # [B, out, in]
    kernels = weight.unsqueeze(0) * scales.unsqueeze(3).unsqueeze(4)
    out = F.conv2d(
        x.reshape(1, batch * in_channels, height, width),
        kernels.reshape(batch * out_channels, in_channels, kernel_size, kernel_size),
        padding=kernel_size // 2,
        groups=batch,
    )
    return out.reshape(batch, out_channels, height, width)


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalized learning rate: weights are N(0, 1) scaled at run time."""

    def __init__(self, in_features, out_features, bias_init=0.0, lr_multiplier=1.0, activate=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], bias_init / lr_multiplier))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.activate = activate

    def forward(self, x):
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN if self.activate else x


class MappingNetwork(nn.Module):
    """z (and a class label c) -> w, broadcast to ws [B, num_ws, w_dim], with truncation."""

    def __init__(self, z_dim, c_dim, w_dim, num_ws, num_layers):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.embed = EqualizedLinear(c_dim, w_dim) if c_dim else None
        in_features = z_dim + (w_dim if c_dim else 0)
        self.layers = nn.Sequential(*[
            EqualizedLinear(in_features if i == 0 else w_dim, w_dim,
                            lr_multiplier=MAPPING_LR_MULTIPLIER, activate=True)
            for i in range(num_layers)
        ])
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self._estimate_w_avg()

    @torch.no_grad()
    def _estimate_w_avg(self):
        # An untrained network has no running average yet; this makes truncation meaningful.
        z = torch.randn(W_AVG_SAMPLES, self.z_dim)
        c = None
        if self.c_dim:
            c = F.one_hot(torch.randint(self.c_dim, (W_AVG_SAMPLES,)), self.c_dim).float()
        self.w_avg.copy_(self._map(z, c).mean(dim=0))

    def _map(self, z, c):
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape [batch, {self.z_dim}], got {list(z.shape)}")
        dtype = self.w_avg.dtype
        x = normalize_2nd_moment(z.to(dtype))
        if self.c_dim:
            if c is None:
                raise ValueError(f"this generator is class-conditional (c_dim={self.c_dim}): "
                                 f"pass c as one-hot labels of shape [batch, {self.c_dim}]")
            if tuple(c.shape) != (z.shape[0], self.c_dim):
                raise ValueError(f"c must have shape [{z.shape[0]}, {self.c_dim}], got {list(c.shape)}")
            x = torch.cat([x, normalize_2nd_moment(self.embed(c.to(dtype)))], dim=1)
        return self.layers(x)

    def forward(self, z, c=None, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        w = self._map(z, c)
        if update_emas:
            self.w_avg.copy_(w.detach().mean(dim=0).lerp(self.w_avg, W_AVG_BETA))
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cutoff] = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)
        return ws


class StyleConv(nn.Module):
    """Modulated, demodulated 3x3 convolution followed by per-pixel noise, bias and leaky ReLU."""

    def __init__(self, in_channels, out_channels, w_dim, resolution):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.tensor(NOISE_STRENGTH_INIT))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(self, x, w, noise_mode):
        x = modulated_conv2d(x, self.weight, self.affine(w))
        if noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        elif noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength
        x = x + self.bias.reshape(1, -1, 1, 1)
        return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN


class ToRGB(nn.Module):
    """Modulated 1x1 convolution (no demodulation) from features to image channels."""

    def __init__(self, in_channels, img_channels, w_dim, init_gain):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(img_channels, in_channels, 1, 1) * init_gain)
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x, w):
        styles = self.affine(w) * self.weight_gain
        return modulated_conv2d(x, self.weight, styles, demodulate=False) + self.bias.reshape(1, -1, 1, 1)


class SynthesisBlock(nn.Module):
    """One resolution: the learned 4x4 constant (first block) or a 2x upsampling, then the
    style convolutions and a toRGB whose output is added to the upsampled image so far."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels, rgb_init_gain):
        super().__init__()
        self.is_first = in_channels == 0
        if self.is_first:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            conv_inputs = [out_channels]
        else:
            conv_inputs = [in_channels, out_channels]
        self.convs = nn.ModuleList(StyleConv(c, out_channels, w_dim, resolution) for c in conv_inputs)
        self.torgb = ToRGB(out_channels, img_channels, w_dim, rgb_init_gain)
        self.num_ws = len(self.convs) + 1

    def forward(self, x, img, block_ws, noise_mode):
        if self.is_first:
            x = self.const.unsqueeze(0).expand(block_ws.shape[0], -1, -1, -1)
        else:
            x = upsample2x(x)
        for index, conv in enumerate(self.convs):
            x = conv(x, block_ws[:, index], noise_mode)
        rgb = self.torgb(x, block_ws[:, -1])
        img = rgb if img is None else upsample2x(img) + rgb
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [B, num_ws, w_dim] -> images [B, img_channels, R, R]; each style input uses one w."""

    def __init__(self, w_dim, img_resolution, img_channels, channel_base, channel_max):
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        resolutions = [2 ** i for i in range(2, int(math.log2(img_resolution)) + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in resolutions}
        rgb_init_gain = TO_RGB_INIT_GAIN / math.sqrt(len(resolutions))
        self.blocks = nn.ModuleList(
            SynthesisBlock(channels.get(res // 2, 0), channels[res], w_dim, res, img_channels, rgb_init_gain)
            for res in resolutions
        )
        self.num_ws = sum(block.num_ws for block in self.blocks)

    def forward(self, ws, noise_mode="const", force_fp32=False, **kwargs):
        """force_fp32 and further keyword arguments (e.g. update_emas) exist for compatibility with
        NVIDIA's generators and change nothing here: this network always runs in its own dtype."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must have shape [batch, {self.num_ws}, {self.w_dim}], got "
                             f"{list(ws.shape)}; repeat a w of shape [batch, {self.w_dim}] with "
                             f"w.unsqueeze(1).repeat(1, {self.num_ws}, 1)")
        x = img = None
        start = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, start:start + block.num_ws], noise_mode)
            start += block.num_ws
        return img


class CompactGenerator(nn.Module):
    """StyleGAN2-style generator with NVIDIA's attributes and call signatures (see module doc)."""

    def __init__(self, z_dim=512, w_dim=512, c_dim=0, img_resolution=32, img_channels=3,
                 mapping_layers=4, channel_base=1024, channel_max=128):
        super().__init__()
        if img_resolution < MIN_RESOLUTION or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= {MIN_RESOLUTION}, "
                             f"got {img_resolution}")
        minimums = (("z_dim", z_dim, 1), ("w_dim", w_dim, 1), ("c_dim", c_dim, 0),
                    ("img_channels", img_channels, 1), ("mapping_layers", mapping_layers, 1),
                    ("channel_max", channel_max, 1),
                    ("channel_base", channel_base, img_resolution))  # >= 1 channel at full size
        for name, value, minimum in minimums:
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        self.z_dim, self.w_dim, self.c_dim = z_dim, w_dim, c_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, channel_base, channel_max)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, mapping_layers)

    def forward(self, z, c=None, truncation_psi=1, truncation_cutoff=None, update_emas=False,
                **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, update_emas=update_emas, **synthesis_kwargs)


def build_default_generator(img_resolution: int, img_channels: int, c_dim: int = 0,
                            w_dim: int = 512) -> CompactGenerator:
    """A light generator whose output size is the smallest power of two >= img_resolution
    (at least 8), e.g. 28 -> 32; callers resize/crop to the clients' image size."""
    if img_resolution < 1:
        raise ValueError(f"img_resolution must be >= 1, got {img_resolution}")
    resolution = max(MIN_RESOLUTION, 1 << (img_resolution - 1).bit_length())
    return CompactGenerator(z_dim=w_dim, w_dim=w_dim, c_dim=c_dim, img_resolution=resolution,
                            img_channels=img_channels)
