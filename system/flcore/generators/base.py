"""What every generator of the registry (flcore/generators/registry.py) is: an entry that loads it and knows the
paper's FedKTL hyperparameters for it, and the adapter it loads, which FedKTL's loop (flcore/servers/serverktl.py)
draws valid latents from and renders them with."""
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from flcore.settings import Settings, option


@dataclass(frozen=True)
class PaperDefaults:
    """The paper's FedKTL hyperparameters for a generator; -lam, -mu and -slr override them."""
    lamda: float  # weight of the centroid term in domain alignment
    mu: float  # weight of the clients' knowledge-transfer task
    server_lr: float  # learning rate of domain alignment


@runtime_checkable
class GeneratorAdapter(Protocol):
    latent_dim: int

    def sample_valid(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """n latents [n, latent_dim] from the generator's prior, drawn with `rng` (a CPU torch.Generator)."""

    def renderable(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents the generator renders well nearest to `latents` (the identity for StyleGAN's W)."""

    def render(self, latents: torch.Tensor) -> torch.Tensor:
        """One image per latent, [n, C, H, W], nominally in [-1, 1] (the loop clamps to it)."""


class GeneratorEntry:
    """One kind of generator in the registry. `load(settings, context, cache)` returns its adapter, loaded from
    settings.generator_path (-GPath) onto context.device (context: the algorithm's RunContext; `cache`, a LoadCache,
    keeps what is slow to load between the runs of an experiment); settings are the FedKTL settings (-GPath, -lrs,
    the Stable Diffusion options). `recognizes(path)`: whether the file at `path` is of this kind (for -gen auto)."""
    defaults: PaperDefaults | None = None  # the paper's hyperparameters, where the paper has them
    reads_path = True  # whether it loads from -GPath (the untrained and the installed face generators do not)

    def recognizes(self, path) -> bool:
        return False

    def load(self, settings, context, cache) -> GeneratorAdapter:
        raise NotImplementedError


@dataclass(frozen=True)
class GeneratorSettings(Settings):
    """The flags of every algorithm that renders images with a generator of the registry (FedKTL, FGL)."""
    title = "image generator (FedKTL, FGL)"
    generator_path: str = option("", "-GPath", "--generator_path",
                                 help="generator pickle ({'G_ema': G}), DCGAN checkpoint ({'netG_state_dict': ...}) "
                                      "or diffusers folder; empty: the generator chosen by -gen")
    gen_batch_size: int = option(4, "-gbs", "--gen_batch_size", help="images rendered per batch")
