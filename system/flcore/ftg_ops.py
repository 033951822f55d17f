"""FedFTG's server-side fine-tuning (Zhang et al., CVPR 2022) as plain functions over modules and tensors.

A conditional generator G(z, y) is trained to make inputs on which the class-level ensemble of the uploaded client
models predicts y (fidelity), on which the global model disagrees with that ensemble (hard samples), and that differ
as much as their noise does (diversity); the global model is then trained to match the ensemble on them. Labels are
drawn from the clients' pooled label counts (customized label sampling), and client k's vote on a sample of label
y weighs n_k^y / n^y (class-level ensemble)."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

LEAKY_SLOPE = 0.2


class ConditionalGenerator(nn.Module):
    """(noise, label) -> an image in [-1, 1] (the clients' normalization): a linear map to a quarter-size feature map,
    then two upsampling convolution blocks. Its BatchNorm always uses batch statistics (no running statistics to
    drift or to checkpoint)."""

    def __init__(self, noise_dim, num_classes, image_shape, width=64):
        super().__init__()
        channels, height, image_width = image_shape
        self.noise_dim = noise_dim
        self.num_classes = num_classes
        self.image_size = (height, image_width)
        self.start = (math.ceil(height / 4), math.ceil(image_width / 4))
        self.project = nn.Linear(noise_dim + num_classes, 2 * width * self.start[0] * self.start[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width, track_running_stats=False),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width, track_running_stats=False),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width, track_running_stats=False),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, noise, labels):
        one_hot = F.one_hot(labels, self.num_classes).to(noise.dtype)
        maps = self.project(torch.cat([noise, one_hot], 1)).view(len(noise), -1, *self.start)
        images = self.body(maps)
        if images.shape[2:] != self.image_size:  # sizes that are not multiples of 4 (none of the shipped datasets)
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        return images


@dataclass(frozen=True)
class FineTuneSettings:
    iterations: int  # I: rounds of (generator steps, distillation steps), each on a fresh batch of labels and noise
    generator_steps: int  # I_g
    distill_steps: int  # I_d
    batch_size: int
    beta_tran: float  # weight of the hard-sample (disagreement) term in the generator's loss
    beta_div: float  # weight of the diversity term
    learning_rate: float  # the global model's SGD learning rate


def class_ensemble_weights(label_counts):
    """[N, K] label counts of N clients -> [N, K] weights n_k^y / n^y (0 for a class no client holds)."""
    totals = label_counts.sum(0, keepdim=True)
    return torch.where(totals > 0, label_counts / totals.clamp_min(1), torch.zeros_like(label_counts))


def label_distribution(label_counts):
    """Customized label sampling: p(y) proportional to the clients' pooled count of label y."""
    counts = label_counts.sum(0)
    return counts / counts.sum()


def ensemble_logits(teacher, states, weights, images, labels):
    """Class-level ensemble: sum over clients k of n_k^y / n^y times client k's logits, y each sample's label.
    `teacher` is one module of the shared architecture (eval mode) evaluated with each client's `states`."""
    per_sample = weights[:, labels]
    return sum(w.unsqueeze(1) * functional_call(teacher, state, (images,)) for w, state in zip(per_sample, states))


def ensemble_kl(ensemble, student):
    """KL(softmax(ensemble) || softmax(student)) per sample, averaged; gradients reach both sides."""
    return F.kl_div(F.log_softmax(student, 1), F.log_softmax(ensemble, 1), reduction="batchmean", log_target=True)


def diversity_loss(noise, images):
    """exp(-mean over pairs of (image distance x noise distance)): small when images differ as their noise does
    (mean absolute pixel difference, mean squared noise difference)."""
    flat = images.flatten(1)
    image_distance = torch.cdist(flat, flat, p=1) / flat.shape[1]
    noise_distance = torch.cdist(noise, noise, p=2).pow(2) / noise.shape[1]
    return torch.exp(-(image_distance * noise_distance).mean())


def generator_loss(generator, teacher, states, weights, student, noise, labels, beta_tran, beta_div):
    """(loss, parts): CE(ensemble, y) - beta_tran * KL(ensemble || global) + beta_div * diversity."""
    images = generator(noise, labels)
    ensemble = ensemble_logits(teacher, states, weights, images, labels)
    fidelity = F.cross_entropy(ensemble, labels)
    hardness = ensemble_kl(ensemble, student(images))
    diversity = diversity_loss(noise, images)
    loss = fidelity - beta_tran * hardness + beta_div * diversity
    return loss, {"fidelity": fidelity.item(), "hardness": hardness.item(), "diversity": diversity.item()}


def distill_loss(student, ensemble, images):
    """KL(ensemble || global) on fixed generated images and the ensemble's fixed logits on them; only the global
    model learns."""
    return ensemble_kl(ensemble, student(images))


def sample_batch(prior, batch_size, noise_dim, rng, device):
    """Labels from the label distribution and Gaussian noise, drawn on the CPU from `rng` (the same on any device)."""
    labels = torch.multinomial(prior.cpu(), batch_size, replacement=True, generator=rng)
    noise = torch.randn(batch_size, noise_dim, generator=rng)
    return noise.to(device), labels.to(device)


def fine_tune(student, teacher, states, label_counts, generator, generator_optimizer, settings, rng):
    """FedFTG's server update of the averaged global model `student`, in place; returns the round's mean losses.

    Both models run in eval mode: the global model's BatchNorm normalizes generated inputs with the running
    statistics averaged from the clients' real data, as at test time, and generated inputs never change them."""
    device = next(student.parameters()).device
    weights = class_ensemble_weights(label_counts.to(device))
    prior = label_distribution(label_counts)
    student_optimizer = torch.optim.SGD(student.parameters(), lr=settings.learning_rate)
    student.eval()
    teacher.eval()
    generator.train()
    totals = {"generator_loss": 0.0, "fidelity": 0.0, "hardness": 0.0, "diversity": 0.0, "distill_loss": 0.0}
    for _ in range(settings.iterations):
        noise, labels = sample_batch(prior, settings.batch_size, generator.noise_dim, rng, device)
        student.requires_grad_(False)
        for _ in range(settings.generator_steps):
            loss, parts = generator_loss(generator, teacher, states, weights, student, noise, labels,
                                         settings.beta_tran, settings.beta_div)
            generator_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            generator_optimizer.step()
            totals["generator_loss"] += loss.item() / settings.generator_steps
            for name, value in parts.items():
                totals[name] += value / settings.generator_steps
        student.requires_grad_(True)
        # The teachers and the images stay fixed over the I_d steps, so the ensemble's logits are computed once.
        with torch.no_grad():
            images = generator(noise, labels)
            ensemble = ensemble_logits(teacher, states, weights, images, labels)
        for _ in range(settings.distill_steps):
            loss = distill_loss(student, ensemble, images)
            student_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            student_optimizer.step()
            totals["distill_loss"] += loss.item() / settings.distill_steps
    return {name: value / settings.iterations for name, value in totals.items()}
