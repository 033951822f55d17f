"""Numerical building blocks of FedKTL (see docs/FEDKTL.md, "One round").

Client side: the fixed simplex ETF classifier, the ArcFace-style margin loss and the
knowledge-transfer loss. Server side: the RBF-kernel MMD, the feature transformer F and the
domain-alignment step that trains F and the latent class centroids Q.
"""
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from flcore.per_class import per_class_means

DEFAULT_MMD_BANDWIDTHS = (10.0, 15.0, 20.0, 50.0)
# The angular margin m and the scale s of the paper's ETF loss.
PAPER_MARGIN = 0.5
PAPER_SCALE = 64.0


def simplex_etf(num_classes: int, rng: torch.Generator, dtype=torch.float32,
                device='cpu') -> torch.Tensor:
    """Fixed simplex ETF M = sqrt(K/(K-1)) P (I - 11^T/K); column c is the class vector e_c."""
    if num_classes < 2:
        raise ValueError(f"simplex_etf needs num_classes >= 2 (got {num_classes}); "
                         "a classifier needs at least two classes")
    # Drawn in float64 on the CPU so a seed gives the same matrix on every device.
    gaussian = torch.randn(num_classes, num_classes, generator=rng, dtype=torch.float64)
    orthonormal, upper = torch.linalg.qr(gaussian)
    # Fixing the signs of R's diagonal makes the QR factor unique, hence Haar-distributed.
    signs = torch.sign(torch.diagonal(upper))
    signs[signs == 0] = 1.0
    orthonormal = orthonormal * signs
    centering = (torch.eye(num_classes, dtype=torch.float64)
                 - torch.full((num_classes, num_classes), 1.0 / num_classes, dtype=torch.float64))
    etf = math.sqrt(num_classes / (num_classes - 1)) * orthonormal @ centering
    return etf.to(device=device, dtype=dtype)


def etf_cosines(features: torch.Tensor, etf: torch.Tensor) -> torch.Tensor:
    """Cosine of each (normalized) feature row with each ETF class vector: [B, K]."""
    return F.normalize(features, dim=1) @ etf


def arc_margin_logits(cosines: torch.Tensor, labels: torch.Tensor, scale: float = PAPER_SCALE,
                      margin: float = PAPER_MARGIN, eps: float = 1e-7) -> torch.Tensor:
    """Scaled cosines with the angular margin added to the true class: s cos(theta_y + m)."""
    if cosines.dim() != 2 or labels.shape != cosines.shape[:1]:
        raise ValueError(f"arc_margin_logits needs cosines [B, K] and labels [B] "
                         f"(got {tuple(cosines.shape)} and {tuple(labels.shape)})")
    if margin == 0:
        return scale * cosines
    true_index = labels.long().unsqueeze(1)
    # arccos has an infinite slope at +-1: clamping keeps value and gradient finite.
    true_cosine = cosines.gather(1, true_index).clamp(-1.0 + eps, 1.0 - eps)
    margin_cosine = torch.cos(torch.acos(true_cosine) + margin)
    return scale * cosines.scatter(1, true_index, margin_cosine)


def arc_margin_loss(cosines: torch.Tensor, labels: torch.Tensor, scale: float = PAPER_SCALE,
                    margin: float = PAPER_MARGIN) -> torch.Tensor:
    """Cross-entropy over the margin logits (the client's classification loss)."""
    return F.cross_entropy(arc_margin_logits(cosines, labels, scale, margin), labels.long())


def log_label_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log pi_c of the labels' add-one smoothed frequencies, (n_c + 1) / (N + C): a class a client never saw keeps a
    finite, low prior."""
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    return torch.log((counts + 1) / (counts.sum() + num_classes)).float()


def knowledge_transfer_loss(projected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error between proj(base(x_G)) and the server's latent vectors q."""
    if projected.shape != targets.shape:
        raise ValueError(f"knowledge_transfer_loss needs equal shapes "
                         f"(got {tuple(projected.shape)} and {tuple(targets.shape)}); "
                         "proj must output latent_dim values")
    return F.mse_loss(projected, targets)


def _squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    rows_sq = (rows * rows).sum(dim=1, keepdim=True)
    cols_sq = (cols * cols).sum(dim=1).unsqueeze(0)
    # The expansion can dip below zero by rounding; distances cannot.
    return (rows_sq + cols_sq - 2.0 * rows @ cols.T).clamp_min(0.0)


def _rbf_kernel_mean(rows: torch.Tensor, cols: torch.Tensor, bandwidths: Iterable[float]):
    distances = _squared_distances(rows, cols)
    return sum(torch.exp(-distances / (2.0 * a)) for a in bandwidths).mean()


def mmd_rbf(x: torch.Tensor, y: torch.Tensor,
            bandwidths=DEFAULT_MMD_BANDWIDTHS) -> torch.Tensor:
    """Biased MMD^2 estimate with the kernel sum_a exp(-||u - v||^2 / (2 a))."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or len(x) == 0 or len(y) == 0:
        raise ValueError(f"mmd_rbf needs non-empty samples [n, d] and [m, d] "
                         f"(got {tuple(x.shape)} and {tuple(y.shape)})")
    bandwidths = tuple(bandwidths)
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"mmd_rbf needs positive bandwidths (got {bandwidths})")
    return (_rbf_kernel_mean(x, x, bandwidths) + _rbf_kernel_mean(y, y, bandwidths)
            - 2.0 * _rbf_kernel_mean(x, y, bandwidths))


class FeatureTransformer(nn.Module):
    """F: Linear(K, K) - BatchNorm1d(K) - ReLU - Linear(K, latent_dim), prototypes -> latents."""

    def __init__(self, num_classes: int, latent_dim: int):
        super().__init__()
        if num_classes < 1 or latent_dim < 1:
            raise ValueError(f"FeatureTransformer needs positive sizes "
                             f"(got num_classes={num_classes}, latent_dim={latent_dim})")
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.layers = nn.Sequential(
            nn.Linear(num_classes, num_classes),
            nn.BatchNorm1d(num_classes),
            nn.ReLU(),
            nn.Linear(num_classes, latent_dim),
        )

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        return self.layers(prototypes)


class FixedProjection(nn.Module):
    """The ablation without F: a fixed (untrained) random Linear(K, latent_dim), same interface as F."""

    def __init__(self, num_classes: int, latent_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.linear = nn.Linear(num_classes, latent_dim).requires_grad_(False)

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        return self.linear(prototypes)


def _check_labels(labels: torch.Tensor, count: int, num_classes: int) -> None:
    if labels.shape != (count,):
        raise ValueError(f"need one label per prototype: expected shape ({count},), "
                         f"got {tuple(labels.shape)}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) "
                         f"(got {int(labels.min())}..{int(labels.max())})")


def class_mean_reset(centroids: torch.Tensor, mapped: torch.Tensor,
                     labels: torch.Tensor, renderable: Callable[[torch.Tensor], torch.Tensor] = None) -> None:
    """In place: centroids[c] = mean of mapped[labels == c] for every class present, passed through
    `renderable` (the generator adapter's map to latents it renders well) when given."""
    if mapped.dim() != 2 or mapped.shape[1] != centroids.shape[1]:
        raise ValueError(f"class_mean_reset needs mapped [P, {centroids.shape[1]}] "
                         f"(got {tuple(mapped.shape)})")
    num_classes = centroids.shape[0]
    _check_labels(labels, len(mapped), num_classes)
    with torch.no_grad():
        labels = labels.long().to(centroids.device)
        mapped = mapped.to(device=centroids.device, dtype=centroids.dtype)
        means, counts = per_class_means(mapped, labels, num_classes)
        present = counts > 0
        means = means[present]
        centroids[present] = means if renderable is None else renderable(means)


def prototype_batches(num_prototypes: int, batch_size: int,
                      rng: torch.Generator) -> list:
    """Shuffled batches of prototype indices, none of size 1 (BatchNorm cannot train on one)."""
    _check_batching(num_prototypes, batch_size)
    batches = list(torch.randperm(num_prototypes, generator=rng).split(batch_size))
    if len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _check_batching(num_prototypes: int, batch_size: int) -> None:
    if num_prototypes < 2:
        raise ValueError(f"domain alignment needs at least 2 prototypes (got {num_prototypes}); "
                         "collect prototypes from more clients or classes")
    if batch_size < 2:
        raise ValueError(f"server batch size must be at least 2 (got {batch_size}); "
                         "BatchNorm cannot train on a batch of one")


def _reset_to_class_means(transformer: FeatureTransformer, centroids: torch.Tensor,
                          prototypes: torch.Tensor, labels: torch.Tensor, renderable) -> None:
    transformer.eval()
    with torch.no_grad():
        class_mean_reset(centroids, transformer(prototypes), labels, renderable)


def align_domains(transformer: FeatureTransformer, centroids: nn.Parameter,
                  prototypes: torch.Tensor, labels: torch.Tensor,
                  sample_valid: Callable[[int], torch.Tensor], optimizer: torch.optim.Optimizer,
                  epochs: int, batch_size: int, lamda: float, rng: torch.Generator,
                  grad_clip: float = 100.0, use_mmd: bool = True, reset_centroids: bool = True,
                  renderable: Callable[[torch.Tensor], torch.Tensor] = None) -> dict:
    """Server domain alignment: train F and Q on the pooled prototypes (spec step 3).

    Returns the last epoch's mean 'mmd', 'centroid' (MSE) and 'loss' terms (floats) and the
    number of optimizer 'steps' (int). Leaves F in eval mode and, with `reset_centroids` (the paper),
    Q at the class means of F(P) before and after training (each passed through `renderable` when given, so
    the centroid term pulls F(P) towards latents the generator renders well).
    """
    if epochs < 1:
        raise ValueError(f"align_domains needs epochs >= 1 (got {epochs})")
    if prototypes.dim() != 2 or prototypes.shape[1] != transformer.num_classes:
        raise ValueError(f"prototypes must have shape [P, {transformer.num_classes}] "
                         f"(got {tuple(prototypes.shape)})")
    _check_labels(labels, len(prototypes), centroids.shape[0])
    _check_batching(len(prototypes), batch_size)
    prototypes = prototypes.detach()
    labels = labels.long().to(prototypes.device)
    clipped_params = list(transformer.parameters()) + [centroids]

    if reset_centroids:
        _reset_to_class_means(transformer, centroids, prototypes, labels, renderable)
    transformer.train()
    steps = 0
    for _ in range(epochs):
        sums = {'mmd': 0.0, 'centroid': 0.0, 'loss': 0.0}
        batches = prototype_batches(len(prototypes), batch_size, rng)
        for batch in batches:
            batch = batch.to(prototypes.device)
            mapped = transformer(prototypes[batch])
            centroid_term = F.mse_loss(mapped, centroids[labels[batch]])
            if use_mmd:
                with torch.no_grad():
                    valid = sample_valid(len(batch)).detach().to(mapped)
                mmd_term = mmd_rbf(mapped, valid)
            else:
                mmd_term = torch.zeros((), dtype=mapped.dtype, device=mapped.device)
            loss = mmd_term + lamda * centroid_term
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(clipped_params, grad_clip)
            optimizer.step()
            steps += 1
            sums['mmd'] += mmd_term.item()
            sums['centroid'] += centroid_term.item()
            sums['loss'] += loss.item()
    transformer.eval()
    if reset_centroids:
        _reset_to_class_means(transformer, centroids, prototypes, labels, renderable)

    stats = {name: total / len(batches) for name, total in sums.items()}
    stats['steps'] = steps
    return stats
