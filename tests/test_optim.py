"""Gradient clipping: the same bits as torch.nn.utils.clip_grad_norm_ in every regime."""

import pytest
import torch

from latentdiffusion.training.optim import clip_gradients


@pytest.mark.parametrize("scale, nan", [(0.01, False), (100.0, False), (0.01, True)])  # within, clipped, not finite
def test_clip_gradients_is_torch_clip_grad_norm_bit_for_bit(scale, nan):
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (64,), (32, 16, 3, 3), (5,)]
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=g) * scale
        b.grad = a.grad.clone()
    if nan:  # one NaN makes the norm NaN, and torch's clip then every gradient
        ours[1].grad[3] = theirs[1].grad[3] = float("nan")
    ours.append(torch.nn.Parameter(torch.zeros(3)))  # without a gradient: skipped by both
    theirs.append(torch.nn.Parameter(torch.zeros(3)))
    norm = clip_gradients(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(norm, expected, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(ours[:-1], theirs[:-1]):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)
    if scale == 100.0:
        assert abs(float(torch.nn.utils.get_total_norm([p.grad for p in ours[:-1]])) - 1.0) < 1e-5


def test_clip_gradients_without_a_limit_only_measures():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    assert float(clip_gradients([p], 0.0)) == 6.0 and torch.equal(p.grad, torch.full((4,), 3.0))
    assert float(clip_gradients([torch.nn.Parameter(torch.zeros(2))], 1.0)) == 0.0
