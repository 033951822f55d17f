"""grid_sample with the settings NVIDIA's augmentation pipeline uses. NVIDIA's version replaced
PyTorch's backward pass to get second-order gradients on old PyTorch; current PyTorch has them."""
import torch.nn.functional as F


def grid_sample(input, grid):
    """Bilinear sampling of input [N, C, H, W] at grid [N, H_out, W_out, 2] (x, y in [-1, 1], pixel
    centres, zeros outside)."""
    return F.grid_sample(input=input, grid=grid, mode="bilinear", padding_mode="zeros", align_corners=False)
