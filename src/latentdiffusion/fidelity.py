"""How close an upsampled image is to the true high-resolution one: PSNR and two edge measures on Sobel gradients.

- PSNR (dB) against the truth, images in [0, 1].
- Edge sharpness: the mean Sobel gradient magnitude on the truth's edge pixels (its `EDGE_SHARE` strongest-gradient
  pixels), relative to the truth's there: 1.0 is as sharp as the truth, blur lowers it.
- Edge error: the mean absolute difference of the Sobel gradient magnitudes from the truth's over all pixels (a blur
  and a ringing or misplaced edge both raise it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EDGE_SHARE = 0.10  # the truth's strongest-gradient pixels that count as its edges
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """|Sobel gradient| of the luminance of images (B, 3, H, W) in [0, 1] -> (B, H-2, W-2)."""
    grey = (images * torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype).view(1, 1, 3, 3)
    gx, gy = F.conv2d(grey, kx), F.conv2d(grey, kx.transpose(2, 3))
    return (gx**2 + gy**2).sqrt()[:, 0]


def measures(images: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """PSNR (mean over images), edge sharpness and edge error of images against truth, both (B, 3, H, W) in [0, 1]."""
    mse = (images - truth).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    grad, grad_true = sobel_magnitude(images), sobel_magnitude(truth)
    threshold = torch.quantile(grad_true.flatten(1), 1 - EDGE_SHARE, dim=1).view(-1, 1, 1)
    edges = grad_true >= threshold
    sharpness = (grad * edges).sum() / (grad_true * edges).sum()
    return {"psnr_db": float((10 * torch.log10(1 / mse)).mean()), "edge_sharpness": float(sharpness),
            "edge_error": float((grad - grad_true).abs().mean())}
