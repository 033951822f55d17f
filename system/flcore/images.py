"""Generated images as the clients see them: any generator's output in the clients' shape and normalization, and
how distinct a set of such images is. Shared by the algorithms that make images (FedKTL, FGL)."""
import math

import torch
import torch.nn.functional as F

from flcore.errors import UserError


def to_client_images(images, image_shape):
    """Generator output in [-1, 1] -> the clients' shape and normalization (mean 0.5, std 0.5 per channel):
    channels matched, resized so the short side fits, center-cropped."""
    channels, height, width = image_shape
    images = images.float().clamp(-1, 1)
    if images.shape[1] == 3 and channels == 1:
        images = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)).sum(1, True)
    elif images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != channels:
        raise UserError(f"the generator makes {images.shape[1]}-channel images; clients need {channels}")
    scale = max(height / images.shape[2], width / images.shape[3])
    size = (max(height, round(images.shape[2] * scale)), max(width, round(images.shape[3] * scale)))
    if size != tuple(images.shape[2:]):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    # [0, 1] -> normalized with mean 0.5, std 0.5 is the identity on [-1, 1] up to the clamp.
    return images[:, :, top:top + height, left:left + width].clamp(-1, 1).contiguous()


@torch.no_grad()
def image_metrics(images):
    """How distinct the K class images are: their mean pairwise RMS distance and mean per-image pixel std
    (both in the clients' normalization; a generator's blurred average image scores low on both)."""
    flat = images.flatten(1).float()
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    k = len(flat)
    pairwise = float(distances.sum() / (k * (k - 1))) if k > 1 else 0.0
    return {"image_distance": pairwise, "image_std": float(flat.std(dim=1).mean())}
