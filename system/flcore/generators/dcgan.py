"""Plain PyTorch DCGAN-style generators with a Gaussian prior, and two pre-trained ones: the face generator that
the `gan-face-generate` wheel ships (a DCGAN trained on DigiFace-1M, z of 100 values -> 64x64 RGB) and the natural-
image generator this repository ships (trained by stylegan/pretrain_generator.py on 30,000 Tiny-ImageNet images,
32x32 RGB). Their registry entries (flcore/generators/registry.py): "dcgan" (a checkpoint in -GPath), "face-dcgan"
and "tiny-imagenet".

The weights are read from the installed wheel's files; the package itself is never imported (it pulls in
wandb and a training script we do not need). Install it without its dependencies:
    pip install --no-deps gan-face-generate==1.1.1
"""
import math
import os
import zipfile
from importlib import metadata

import torch
from torch import nn
from tqdm import tqdm

from flcore.errors import UserError
from flcore.generators.base import GeneratorEntry
from flcore.paths import STYLEGAN_DIR
from flcore.generators.stylegan import UNTRAINED

FACE_DCGAN_PACKAGE = "gan-face-generate"
FACE_DCGAN_VERSION = "1.1.1"
FACE_DCGAN_FILE = "gan_face_generate/weights.tar"
FACE_DCGAN_INSTALL = f"pip install --no-deps {FACE_DCGAN_PACKAGE}=={FACE_DCGAN_VERSION}"
CHECKPOINT_KEY = "netG_state_dict"
TINY_IMAGENET_DCGAN = os.path.join(STYLEGAN_DIR, "tiny-imagenet-dcgan", "tiny_imagenet32_dcgan.pt")
KERNEL = 4


class DCGANLoadError(ValueError):
    """A DCGAN checkpoint that cannot be used; the message names the fix."""


class DCGANGenerator(nn.Module):
    """z [N, z_dim] -> images [N, C, R, R] in [-1, 1], R = 4 * 2**len(widths).

    A 4x4 transposed convolution lifts z to widths[0] x 4 x 4; each further block doubles the side
    (transposed convolution, stride 2) into the next width; every block is followed by BatchNorm and
    ReLU; a last doubling to `img_channels` and tanh make the image. No bias anywhere (BatchNorm follows)."""

    def __init__(self, z_dim=100, widths=(512, 256, 128, 64), img_channels=3):
        super().__init__()
        self.z_dim = z_dim
        self.widths = tuple(widths)
        self.img_channels = img_channels
        self.img_resolution = KERNEL * 2 ** len(self.widths)
        blocks = []
        for index, (c_in, c_out) in enumerate(zip((z_dim,) + self.widths[:-1], self.widths)):
            first = index == 0
            blocks.append(nn.Sequential(
                nn.ConvTranspose2d(c_in, c_out, KERNEL, stride=1 if first else 2, padding=0 if first else 1,
                                   bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)))
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.ConvTranspose2d(self.widths[-1], img_channels, KERNEL, stride=2, padding=1, bias=False)

    def forward(self, z):
        return torch.tanh(self.to_image(self.blocks(z.reshape(len(z), self.z_dim, 1, 1))))


def _from_sequential_keys(state):
    """The common `main.<i>` layout (conv, BN, ReLU repeated, then the last conv and tanh) -> our names."""
    convs = sorted({int(k.split(".")[1]) for k, v in state.items() if k.endswith(".weight") and v.dim() == 4})
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "main":
            raise DCGANLoadError(f"unexpected entry '{key}' in the generator's state dict; expected the DCGAN "
                                 f"layout main.<i>.<name> (transposed convolutions, BatchNorm, ReLU, tanh)")
        index, name = int(parts[1]), parts[2]
        block = index // 3
        if index == convs[-1]:
            renamed[f"to_image.{name}"] = value
        elif index % 3 == 0:
            renamed[f"blocks.{block}.0.{name}"] = value
        else:
            renamed[f"blocks.{block}.1.{name}"] = value
    return renamed


def generator_from_state_dict(state) -> DCGANGenerator:
    """Builds a DCGANGenerator sized from the transposed convolutions' shapes and loads `state` into it."""
    if any(k.startswith("main.") for k in state):
        state = _from_sequential_keys(state)
    conv_shapes = [state[k].shape for k in sorted(state, key=_layer_order)
                   if k.endswith(".weight") and state[k].dim() == 4]
    if len(conv_shapes) < 2:
        raise DCGANLoadError("the state dict holds fewer than two transposed convolutions; not a DCGAN generator")
    z_dim = conv_shapes[0][0]
    widths = tuple(shape[1] for shape in conv_shapes[:-1])
    G = DCGANGenerator(z_dim=z_dim, widths=widths, img_channels=conv_shapes[-1][1])
    try:
        G.load_state_dict(state)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise DCGANLoadError(f"the weights do not fit a DCGAN generator ({first_line})") from None
    return G


def _layer_order(key):
    parts = key.split(".")
    return (1, 0) if parts[0] == "to_image" else (0, int(parts[1]))


def is_dcgan_checkpoint(path) -> bool:
    """True for a file in torch.save's zip format, which -GPath reads as a DCGAN checkpoint (load_dcgan_checkpoint
    then says what is wrong with it); NVIDIA's network pickles are plain pickles. Only the zip header is read."""
    return zipfile.is_zipfile(path)


def load_dcgan_checkpoint(path, device="cpu") -> DCGANGenerator:
    """A DCGAN generator from a torch checkpoint ({'netG_state_dict': ...} or a bare state dict), in eval mode,
    frozen, on `device`. Checkpoints saved on CUDA load on the CPU too."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DCGANLoadError(f"no DCGAN checkpoint at {path}; check the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DCGANLoadError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}); "
                             f"reinstall it with: {FACE_DCGAN_INSTALL}") from None
    state = checkpoint.get(CHECKPOINT_KEY, checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DCGANLoadError(f"{path} holds no generator state dict (expected the key '{CHECKPOINT_KEY}')")
    return generator_from_state_dict(state).to(device).eval().requires_grad_(False)


def face_dcgan_weights_path():
    """Where the installed gan-face-generate wheel keeps its weights, or None when it is not installed."""
    try:
        distribution = metadata.distribution(FACE_DCGAN_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    path = os.fspath(distribution.locate_file(FACE_DCGAN_FILE))
    return path if os.path.isfile(path) else None


def typical_gaussian_norm(dim: int) -> float:
    """E||z|| for z ~ N(0, I_dim): sqrt(2) Gamma((d+1)/2) / Gamma(d/2), about sqrt(d - 1/2)."""
    return math.sqrt(2.0) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))


def rescale_to_norm(latents: torch.Tensor, norm: float) -> torch.Tensor:
    """Each row moved radially to the given norm (a zero row stays zero)."""
    lengths = latents.norm(dim=1, keepdim=True)
    return latents * (norm / lengths.clamp_min(torch.finfo(latents.dtype).tiny))


class GaussianLatents:
    """Adapter for a generator whose latent is z ~ N(0, sigma^2 I) itself (DCGAN-style).

    A class mean of Gaussian latents has a far smaller norm than any sample (samples concentrate near
    sigma * sqrt(d)); such a latent renders the generator's blurred average image. `renderable` moves a
    latent radially back to the typical norm, as spherical interpolation does, when `rescale` is on."""

    def __init__(self, G, device, rescale=True):
        self.G = G.to(device).eval().requires_grad_(False)
        self.device = device
        self.latent_dim = G.z_dim
        self.rescale = rescale

    def sample_valid(self, n, rng):
        return torch.randn(n, self.latent_dim, generator=rng).to(self.device)

    def renderable(self, latents):
        if not self.rescale:
            return latents
        return rescale_to_norm(latents, typical_gaussian_norm(self.latent_dim))

    def render(self, latents):
        return self.G(latents.to(self.device))


def dcgan_adapter(path, settings, device):
    try:
        G = load_dcgan_checkpoint(path, device=device)
    except DCGANLoadError as exc:
        raise UserError(str(exc)) from None
    return GaussianLatents(G, device, rescale=settings.latent_rescale)


class DCGANCheckpoint(GeneratorEntry):
    """A DCGAN checkpoint in -GPath (torch.save's zip format)."""

    def recognizes(self, path):
        return is_dcgan_checkpoint(path)

    def load(self, settings, context, cache):
        return dcgan_adapter(settings.generator_path, settings, context.device)


class FaceDCGAN(GeneratorEntry):
    """The face DCGAN of the installed gan-face-generate wheel; the untrained built-in when it is not installed."""
    reads_path = False

    def load(self, settings, context, cache):
        weights = face_dcgan_weights_path()
        if weights is None:
            tqdm.write(f"FedKTL: the pre-trained face generator is not installed ({FACE_DCGAN_INSTALL}); "
                       f"falling back to the untrained built-in generator.")
            return UNTRAINED.load(settings, context, cache)
        tqdm.write(f"FedKTL: no -GPath given, so images come from the pre-trained face DCGAN ({weights}); "
                   f"-gen untrained selects the untrained built-in StyleGAN-style generator.")
        return dcgan_adapter(weights, settings, context.device)


class TinyImageNetDCGAN(GeneratorEntry):
    """The natural-image DCGAN committed in stylegan/tiny-imagenet-dcgan/ (its README gives the training command)."""
    reads_path = False

    def load(self, settings, context, cache):
        if not os.path.isfile(TINY_IMAGENET_DCGAN):
            raise UserError(f"-gen tiny-imagenet: {TINY_IMAGENET_DCGAN} is missing; restore it with git checkout, or "
                            f"train it with the command in stylegan/tiny-imagenet-dcgan/README.md")
        tqdm.write(f"FedKTL: images come from the natural-image DCGAN trained on Tiny-ImageNet ({TINY_IMAGENET_DCGAN})")
        return dcgan_adapter(TINY_IMAGENET_DCGAN, settings, context.device)


DCGAN = DCGANCheckpoint()
FACE_DCGAN = FaceDCGAN()
TINY_IMAGENET = TinyImageNetDCGAN()
