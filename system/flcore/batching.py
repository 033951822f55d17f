"""Mini-batches of an epoch, shared by clients and server-side training."""
import torch


def shuffled_batches(num_samples, batch_size, rng):
    """Index batches of one shuffled epoch; a last batch of one sample joins the previous one
    (BatchNorm cannot normalize a single sample in training mode)."""
    order = torch.randperm(num_samples, generator=rng)
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches
