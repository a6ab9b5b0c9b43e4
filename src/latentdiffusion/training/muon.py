"""Muon for the weight matrices of linear and convolution layers, AdamW for every other parameter, as one optimizer.

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/) replaces each weight matrix's momentum by the
nearest semi-orthogonal matrix (all singular values about 1, found by a Newton-Schulz iteration) before stepping, so a
step moves every direction of the matrix alike instead of the few its gradients are dominated by. A convolution's
kernel (out, in, kh, kw) is the matrix out x (in kh kw). Biases, norms, embeddings and anything else that is not such
a weight take AdamW's step. The matrices' steps are scaled to the RMS of a typical AdamW step, 0.2 sqrt(max(rows,
columns)) (Liu et al., 2025, "Muon is Scalable for LLM Training"; torch.optim.Muon's adjust_lr_fn="match_rms_adamw"),
so one learning rate and one schedule serve both kinds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Collection

import torch
from torch import nn
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic: as steep as it can be at zero and still end near 1
LINEAR_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fused_adamw_applies(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes every one of `params` (CPU or CUDA floating point): several times
    faster than a loop over tensors on small models."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def matrix_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon orthogonalises: those of `model`'s linear and convolution layers (peft's LoRA factors are
    such layers too); not embeddings, norms or biases."""
    return [m.weight for m in model.modules() if isinstance(m, LINEAR_LAYERS) and m.weight is not None]


def orthogonalize(matrices: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """(B, rows, cols) -> the same shape with the singular vectors kept and every singular value moved towards 1
    (into about [0.7, 1.2] after 5 steps, unless far below the largest): a quintic Newton-Schulz iteration on the
    Frobenius-normalised matrices, in their own dtype. A wide (or, transposed, tall) matrix X iterates on its Gram
    matrix X X^T instead of X, which gives the same iterates up to rounding (every one is a polynomial in X X^T
    times X) in fewer flops."""
    a, b, c = NS_COEFFICIENTS
    tall = matrices.size(-2) > matrices.size(-1)
    x = matrices.mT if tall else matrices
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    rows, cols = x.shape[-2:]
    if cols < 2 * rows:  # near-square: iterate on X itself, X <- (a I + b A + c A^2) X with A = X X^T
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:  # X_k = Q_k X with Q_k symmetric and commuting with G = X X^T: iterate on rows x rows matrices only
        gram = x @ x.mT
        eye = torch.eye(rows, dtype=x.dtype, device=x.device)
        q = None  # Q_0 = I, not multiplied by
        for _ in range(steps):
            g_k = gram if q is None else q @ gram @ q  # X_k X_k^T
            step = torch.baddbmm(g_k, g_k, g_k, beta=b, alpha=c) + a * eye  # a I + b G_k + c G_k^2
            q = step if q is None else step @ q
        x = x if q is None else q @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon on `matrices` (a subset of the parameters, see matrix_parameters), AdamW (torch's kernel, decoupled weight
    decay) on the rest, with the param_groups of the parameters given: each group's lr and weight_decay apply to
    both kinds.

    momentum: Muon's (Nesterov) momentum; betas and eps: AdamW's. Both kinds decay the weights by lr x weight_decay a
    step. The matrices' steps are lr x 0.2 sqrt(max(rows, cols)) x orthogonalize(momentum). Each step orthogonalises
    the matrices of one shape together, as one batch. State per parameter: Muon's momentum_buffer, or AdamW's step,
    exp_avg, exp_avg_sq (as torch.optim.AdamW's, so the AdamW half of a state dict reads as one).
    """

    def __init__(self, params: Any, matrices: Collection[nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8,
                 momentum: float = 0.95, ns_steps: int = 5):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, momentum=momentum, ns_steps=ns_steps,
                        fused=None)
        super().__init__(params, defaults)
        self.matrix_ids = {id(p) for p in matrices}
        for group in self.param_groups:  # the AdamW half as torch.optim.AdamW(fused=True) where every tensor allows
            if group["fused"] is None:
                group["fused"] = fused_adamw_applies(group["params"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            self._muon_step([p for p in with_grad if id(p) in self.matrix_ids], group)
            self._adamw_step([p for p in with_grad if id(p) not in self.matrix_ids], group)
        return loss

    def _muon_step(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        if not params:
            return
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads, buffers = [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum)  # Nesterov
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for p, update in zip(params, updates):
            by_shape[(p.shape[0], p.numel() // p.shape[0])].append((p, update))
        for (rows, cols), pairs in by_shape.items():
            steps = orthogonalize(torch.stack([u.reshape(rows, cols) for _, u in pairs]), group["ns_steps"])
            torch._foreach_add_([p for p, _ in pairs], [s.view_as(p) for (p, _), s in zip(pairs, steps)],
                                alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))

    def _adamw_step(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        if not params:
            return
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
