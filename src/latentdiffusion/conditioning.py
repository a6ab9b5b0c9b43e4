"""What conditions one UNet call, as one bundle: the prompt's context, channels concatenated to the latents, class
labels and ControlNet inputs; and the one function that runs a UNet on a bundle.

Guidance doubles every tensor of the bundle in its one batched call (`Conditioning.cat`), so a new kind of
conditioning is a field here, not an edit to guidance, the samplers or the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .controlnet import ControlNet


class Control(NamedTuple):
    """One ControlNet's input: the ControlNet, called as controlnet(latents, timesteps, context, image, scale,
    class_labels=...) -> (down residuals, one per UNet skip, mid residual), already scaled; its control image
    (B, 3, H, W) in [0, 1]; its conditioning scale. A named tuple, so a (controlnet, image, scale) triple given to
    `Conditioning` reads the same."""

    controlnet: ControlNet
    image: Tensor
    scale: float


@dataclass
class Conditioning:
    """Conditioning of one UNet call for a batch of B samples.

    context:      (B, T, D) text encoder states for cross-attention.
    concat:       (B, Cc, h, w) channels concatenated to the latents (inpainting: mask + masked-image latents;
                  upscaler: the low-resolution image), or None.
    class_labels: (B,) integer labels for the UNet's class embedding (upscaler: noise level), or None.
    controls:     ControlNet inputs (Control: controlnet, image (B,3,H,W) in [0,1], scale).
    """

    context: Tensor
    concat: Tensor | None = None
    class_labels: Tensor | None = None
    controls: list[Control] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.controls = [Control(*c) for c in self.controls]

    @staticmethod
    def cat(bundles: list[Conditioning]) -> Conditioning:
        """The bundles stacked along the batch dimension (guidance: [unconditional, conditional]). Every bundle
        must carry the same kinds of conditioning and the same ControlNets with the same scales."""
        first = bundles[0]
        for b in bundles[1:]:
            if (b.concat is None) != (first.concat is None) or (b.class_labels is None) != (first.class_labels is None):
                raise ValueError("Conditioning.cat: bundles differ in which of concat / class_labels they carry")
            if [(c.controlnet, c.scale) for c in b.controls] != [(c.controlnet, c.scale) for c in first.controls]:
                raise ValueError("Conditioning.cat: bundles differ in their ControlNets or conditioning scales")

        def stack(name: str) -> Tensor | None:
            tensors = [getattr(b, name) for b in bundles]
            return None if tensors[0] is None else torch.cat(tensors)

        controls = [Control(c.controlnet, torch.cat([b.controls[i].image for b in bundles]), c.scale)
                    for i, c in enumerate(first.controls)]
        return Conditioning(stack("context"), stack("concat"), stack("class_labels"), controls)


def run_unet(unet: nn.Module, x: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
    """The UNet's output (B, C, h, w) for latents x (B, C, h, w) at timesteps (0-dim or (B,)) under `cond`:
    concat channels appended to x, each ControlNet's residuals (computed on x with them where the ControlNet is a copy
    of this UNet's encoder, else on x alone, as diffusers' inpainting ControlNet pipeline does) scaled and summed."""
    x_in = x if cond.concat is None else torch.cat([x, cond.concat.to(x.dtype)], dim=1)
    down, mid = None, None
    for controlnet, image, scale in cond.controls:  # each a Control
        x_control = x_in if controlnet.config.unet.in_channels == x_in.shape[1] else x  # a copy of this UNet, or not
        weight = next(controlnet.parameters())  # a ControlNet in another dtype or device runs in its own
        x_c, context, image = (t.to(weight.device, weight.dtype) for t in (x_control, cond.context, image))
        labels = None if cond.class_labels is None else cond.class_labels.to(weight.device)
        d, m = controlnet(x_c, timesteps.to(weight.device), context, image, scale, class_labels=labels)
        d, m = [r.to(x.device, x.dtype) for r in d], m.to(x.device, x.dtype)
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    return unet(x_in, timesteps, cond.context, class_labels=cond.class_labels, down_residuals=down, mid_residual=mid)
