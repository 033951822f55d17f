"""Truncated-SVD compression of tensors, keeping a share of the spectral energy (FedKD's uploads and downloads)."""
import torch


def kept_rank(singular_values, energy):
    """The fewest leading singular values whose squares hold at least `energy` of the total (0 for a zero matrix)."""
    squares = singular_values.double().pow(2)
    total = squares.sum()
    if total == 0:
        return 0
    return min(int((squares.cumsum(0) < energy * total).sum()) + 1, len(singular_values))


def svd_compress(tensor, energy):
    """A tensor of two or more dimensions, seen as [shape[0], rest], as truncated SVD factors {u, s, v} keeping
    `energy`; smaller tensors are sent whole as {full}."""
    if tensor.dim() < 2:
        return {"full": tensor.detach().clone()}
    u, s, v = torch.linalg.svd(tensor.detach().reshape(tensor.shape[0], -1), full_matrices=False)
    rank = kept_rank(s, energy)
    return {"u": u[:, :rank].contiguous(), "s": s[:rank].contiguous(), "v": v[:rank].contiguous()}


def svd_decompress(packed, shape):
    if "full" in packed:
        return packed["full"].reshape(shape)
    return ((packed["u"] * packed["s"]) @ packed["v"]).reshape(shape)


def packed_floats(update):
    """Floats in a compressed update {name: packed}: what actually travels."""
    return sum(t.numel() for packed in update.values() for t in packed.values())
