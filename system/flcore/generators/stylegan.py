"""Generators with NVIDIA's StyleGAN interface (mapping, synthesis, num_ws, w_dim): StyleGAN2/3/XL pickles, this
project's own (stylegan/generator_io.py), and the untrained built-in (stylegan/compact_stylegan.py). The latent space
is W, valid latents are G.mapping(z, c)[:, 0] for z ~ N(0, I) (with random one-hot labels for a class-conditional
generator such as StyleGAN-XL), and a latent is rendered by repeating it over G.num_ws."""
import os

import torch
from tqdm import tqdm

from compact_stylegan import build_default_generator
from flcore.errors import UserError
from flcore.generators.base import GeneratorEntry, PaperDefaults
from generator_io import GeneratorLoadError, load_generator_pickle

IMAGENET_CLASSES = 1000


class StyleGANLatents:
    """W-space adapter for any generator with NVIDIA's interface (mapping, synthesis, num_ws, w_dim)."""

    def __init__(self, G, device):
        self.G = G.to(device).eval().requires_grad_(False)
        self.device = device
        self.latent_dim = G.w_dim

    def labels(self, n, rng):
        """Random one-hot class labels for a class-conditional generator, None for an unconditional one."""
        if self.G.c_dim == 0:
            return None
        classes = torch.randint(self.G.c_dim, (n,), generator=rng)
        return torch.nn.functional.one_hot(classes, self.G.c_dim).float().to(self.device)

    def sample_valid(self, n, rng):
        z = torch.randn(n, self.G.z_dim, generator=rng).to(self.device)
        return self.G.mapping(z, self.labels(n, rng))[:, 0]

    def renderable(self, latents):
        """W latents render as they are (the paper)."""
        return latents

    def render(self, latents):
        ws = latents.to(self.device).unsqueeze(1).repeat(1, self.G.num_ws, 1)
        return self.G.synthesis(ws, noise_mode="const")


class StyleGANPickle(GeneratorEntry):
    """A network pickle ({'G_ema': G}) of StyleGAN2/3 (unconditional or not) or StyleGAN-XL (class-conditional:
    `conditional` refuses an unconditional one). Its untrained stand-in has `builtin_c_dim` classes."""

    def __init__(self, defaults, conditional, weights_readme):
        self.defaults = defaults
        self.conditional = conditional
        self.builtin_c_dim = IMAGENET_CLASSES if conditional else 0
        self.weights_readme = weights_readme

    def recognizes(self, path):
        """Any file: NVIDIA's pickles are plain pickles (the loader says what is wrong with another file)."""
        return os.path.isfile(path)

    def load(self, settings, context, cache):
        path = settings.generator_path
        try:
            G = load_generator_pickle(path, device=context.device)
        except GeneratorLoadError as exc:
            raise UserError(str(exc)) from None
        adapter = StyleGANLatents(G, context.device)
        if self.conditional and G.c_dim == 0:
            raise UserError(f"{path} holds an unconditional generator (c_dim=0), but StyleGAN-XL is "
                            f"class-conditional; use -algo FedKTL-stylegan-3 for it")
        return adapter


class UntrainedStyleGAN(GeneratorEntry):
    """The built-in StyleGAN-style generator with random weights, sized to the clients' images; class-conditional
    like the StyleGAN variant the algorithm is named after (`variants` by registry name; StyleGAN3 otherwise)."""
    reads_path = False

    def __init__(self, variants, fallback):
        self.variants = variants
        self.fallback = fallback

    def load(self, settings, context, cache):
        variant = self.variants.get(settings.auto_generators[-1], self.fallback)
        channels, height, _ = context.image_shape
        G = build_default_generator(height, channels, c_dim=variant.builtin_c_dim)
        tqdm.write(f"FedKTL: images come from an untrained built-in generator "
                   f"(random weights, no pre-trained knowledge); pass -GPath <generator .pkl> "
                   f"(see {variant.weights_readme}) to use pretrained weights.")
        return StyleGANLatents(G, context.device)


# StyleGAN2 and StyleGAN3 pickles share one entry (the same W interface); the paper's values are StyleGAN3's.
STYLEGAN_3 = StyleGANPickle(PaperDefaults(lamda=0.1, mu=50.0, server_lr=0.01), conditional=False,
                            weights_readme="stylegan/stylegan-3-models/README.md")
STYLEGAN_XL = StyleGANPickle(PaperDefaults(lamda=1.0, mu=50.0, server_lr=0.01), conditional=True,
                             weights_readme="stylegan/stylegan-xl-models/README.md")
UNTRAINED = UntrainedStyleGAN({"stylegan-3": STYLEGAN_3, "stylegan-xl": STYLEGAN_XL}, STYLEGAN_3)
