"""Per-class sums and means of rows: what prototypes, class logits and class centroids are made of."""
import torch


def add_per_class(sums, counts, rows, labels, weights=None):
    """In place: sums[c] += the rows labelled c (each times its weight when weights are given) and counts[c] += their
    number (or their total weight). Accumulates in row order, so batches can be added one after another."""
    if weights is None:
        sums.index_add_(0, labels, rows)
        counts.index_add_(0, labels, torch.ones(len(labels), dtype=counts.dtype, device=counts.device))
    else:
        sums.index_add_(0, labels, rows * weights[:, None])
        counts.index_add_(0, labels, weights.to(counts.dtype))
    return sums, counts


def per_class_means(rows, labels, num_classes, weights=None):
    """(means [K, d], counts [K]) of rows [N, d] by label; a class without rows has mean 0 and count 0."""
    sums = torch.zeros(num_classes, rows.shape[1], dtype=rows.dtype, device=rows.device)
    counts = torch.zeros(num_classes, dtype=rows.dtype, device=rows.device)
    add_per_class(sums, counts, rows, labels, weights)
    return sums / torch.where(counts > 0, counts, torch.ones_like(counts))[:, None], counts
