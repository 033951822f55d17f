"""The contract between FedKTL's loop (flcore/servers/serverktl.py) and a generator: a small adapter per generator
says how to draw valid latents, which latents it renders well, and how to render them."""
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class PaperDefaults:
    """The paper's FedKTL hyperparameters for a generator; -lam, -mu and -slr override them."""
    lamda: float  # weight of the centroid term in domain alignment
    mu: float  # weight of the clients' knowledge-transfer task
    server_lr: float  # learning rate of domain alignment


@runtime_checkable
class GeneratorAdapter(Protocol):
    latent_dim: int
    defaults: PaperDefaults

    def sample_valid(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n latents [n, latent_dim] from the generator's prior, drawn with `generator` (a CPU torch.Generator)."""

    def renderable(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents the generator renders well nearest to `latents` (the identity for StyleGAN's W)."""

    def render(self, latents: torch.Tensor) -> torch.Tensor:
        """One image per latent, [n, C, H, W], nominally in [-1, 1] (the loop clamps to it)."""
