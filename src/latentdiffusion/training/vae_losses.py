"""The autoencoder's training losses, after Rombach et al. (2022) / Esser et al. (2021): reconstruction + KL +
a patch discriminator with hinge loss whose weight adapts to the ratio of gradient norms at the decoder's last layer.

No pretrained network can be downloaded here, so LPIPS is replaced by `edge_loss`: an L1 loss on image gradients
at several scales. Pixel L1 lets a decoder blur edges cheaply; the gradient term makes blurred or displaced edges
cost as much as they look, which is most of what LPIPS adds for flat-coloured images, deterministically and for
the price of a few subtractions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al., 2017): strided 4x4 convolutions to a grid of real/fake logits (B, 1, h, w).

    GroupNorm instead of the original BatchNorm: the result of a sample does not depend on the rest of its batch,
    so splitting a batch over processes or accumulation steps does not change the loss.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm_groups: int = 8):
        super().__init__()
        widths = [channels * min(2 ** i, 8) for i in range(layers + 1)]  # (C, 2C, 4C, 8C, 8C, ...)
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(widths[i - 1], widths[i], 4, stride, 1, bias=False),
                       nn.GroupNorm(norm_groups, widths[i]), nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
        self.main = nn.Sequential(*blocks)
        for m in self.modules():  # DCGAN initialisation, as in the original recipe
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @staticmethod
    def min_side(layers: int) -> int:
        """The smallest image side that leaves one logit: `layers` halvings, then two 4x4 convolutions (padding 1)
        that each take one pixel off."""
        return 3 * 2 ** layers

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss (Lim & Ye, 2017): 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """The generator's side of the hinge game: -E[D(G(z))]."""
    return -logits_fake.mean()


def edge_loss(x: Tensor, y: Tensor, scales: int = 3) -> Tensor:
    """Mean L1 distance between the horizontal and vertical finite differences of x and y (B, C, H, W), averaged
    over `scales` levels of a 2x average-pooling pyramid (coarser levels see wider edges)."""
    total = x.new_zeros(())
    for level in range(scales):
        if level:
            if min(x.shape[-2:]) < 4:
                return total / level
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])  # (B, C, H, W-1)
        dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])  # (B, C, H-1, W)
        total = total + dx.abs().mean() + dy.abs().mean()
    return total / scales


def reconstruction_loss(x: Tensor, reconstruction: Tensor, l2_weight: float, edge_weight: float) -> Tensor:
    """The VAE's per-pixel reconstruction loss: L1 + l2_weight * L2 + edge_weight * edge loss, means over pixels."""
    error = x - reconstruction
    return error.abs().mean() + l2_weight * error.square().mean() + edge_weight * edge_loss(x, reconstruction)


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: nn.Parameter) -> Tensor:
    """||grad rec_loss|| / ||grad g_loss|| at the decoder's last layer (Esser et al., 2021, eq. 7), detached:
    the adversarial term then pulls on the decoder about as hard as the reconstruction does."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()
