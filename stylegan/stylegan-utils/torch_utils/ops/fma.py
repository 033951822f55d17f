"""fma: fused multiply-add, a * b + c with broadcasting."""
import torch


def fma(a, b, c):
    """a * b + c; the result has the broadcast shape of the three."""
    return torch.addcmul(c, a, b)
