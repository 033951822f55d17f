"""Plain-PyTorch versions of the ops NVIDIA's StyleGAN networks call, with the same signatures and
results. NVIDIA's optional fused CUDA kernels are not needed: the ``impl`` argument is accepted for
compatibility ('ref' or 'cuda') and every implementation computes the same thing."""

IMPLEMENTATIONS = ("ref", "cuda")


def check_impl(impl):
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
