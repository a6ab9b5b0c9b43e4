"""Muon (training/muon.py): the AdamW half is torch's AdamW, the matrix half is torch.optim.Muon's update (extended to
convolution kernels), the Gram-matrix iteration is the plain one, and a run with it resumes bit-exactly."""

import shutil

import pytest
import torch
import yaml
from torch import nn

from latentdiffusion.errors import ConfigError
from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm
from latentdiffusion.training.muon import Muon, matrix_parameters, orthogonalize
from latentdiffusion.training.optim import make_optimizer
from test_training import assert_identical, ldm_config, vae_dir, weights  # noqa: F401  (vae_dir: a fixture)
from tiny import TINY_LDM


def plain_newton_schulz(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The iteration as Jordan writes it, on a wide (B, r, c) batch: X <- a X + (b A + c A^2) X, A = X X^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def step_both(a: torch.optim.Optimizer, b: torch.optim.Optimizer, pairs: list[tuple[torch.Tensor, torch.Tensor]],
              gradient, steps: int = 3) -> None:
    for step in range(steps):
        for pa, pb in pairs:
            g = gradient(pa, step)
            pa.grad, pb.grad = g.clone(), g.clone()
        a.step()
        b.step()


def test_orthogonalize_is_the_newton_schulz_iteration_in_either_form():
    torch.manual_seed(0)
    wide = torch.randn(3, 16, 144, dtype=torch.float64)  # Gram form (cols >= 2 rows)
    square = torch.randn(3, 24, 32, dtype=torch.float64)  # X itself
    for x in (wide, square):
        torch.testing.assert_close(orthogonalize(x), plain_newton_schulz(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(orthogonalize(x.mT), plain_newton_schulz(x).mT, rtol=1e-9, atol=1e-9)
    singular = torch.linalg.svdvals(orthogonalize(wide.float()))  # a well-conditioned batch: all near 1
    assert singular.min() > 0.6 and singular.max() < 1.25, (singular.min(), singular.max())


def test_adamw_half_is_torch_adamw_exactly():
    torch.manual_seed(0)
    shapes = [(8, 3), (5,), (100, 4)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-3}]  # noqa: E731
    muon = Muon(groups(ours), matrices=[], betas=(0.8, 0.95), weight_decay=0.1)
    adamw = torch.optim.AdamW(groups(theirs), betas=(0.8, 0.95), weight_decay=0.1, fused=True)
    step_both(muon, adamw, list(zip(ours, theirs)), lambda p, step: torch.randn_like(p) * (step + 1))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert muon.state[ours[0]].keys() == adamw.state[theirs[0]].keys()


def test_matrix_half_is_torch_muon_and_a_kernel_is_its_flattened_matrix():
    """torch.optim.Muon (match_rms_adamw scaling) on nn.Linear weights; it orthogonalises in bfloat16, ours in the
    parameter's dtype, so the two agree to bfloat16's rounding, far closer than any other update would. A conv
    kernel (16, 8, 3, 3), stored channels_last, steps exactly as the (16, 72) matrix of its flattened kernel."""
    torch.manual_seed(0)
    linear, conv = nn.Linear(48, 32), nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    flat = nn.Parameter(conv.weight.detach().reshape(16, 72).clone())
    reference = [nn.Parameter(linear.weight.detach().clone())]
    start = linear.weight.detach().clone()
    ours = Muon([{"params": [linear.weight, conv.weight, flat], "lr": 0.02}],
                matrices=[linear.weight, conv.weight, flat], weight_decay=0.1)
    torch_muon = torch.optim.Muon(reference, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    gradients = {p: [torch.randn_like(p) for _ in range(3)] for p in (linear.weight, conv.weight)}
    for step in range(3):
        linear.weight.grad = gradients[linear.weight][step].clone()
        reference[0].grad = gradients[linear.weight][step].clone()
        conv.weight.grad = gradients[conv.weight][step].contiguous(memory_format=torch.channels_last)
        flat.grad = gradients[conv.weight][step].reshape(16, 72).clone()
        ours.step()
        torch_muon.step()
    moved = (reference[0] - start).norm()
    assert moved > 0.1
    assert (linear.weight - reference[0]).norm() < 0.02 * moved
    torch.testing.assert_close(conv.weight.detach().reshape(16, 72), flat.detach(), rtol=0, atol=1e-6)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_make_optimizer_gives_muon_the_linear_and_conv_weights_and_adamw_the_rest():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.LayerNorm(6), nn.Conv1d(6, 4, 1))
    assert [id(p) for p in matrix_parameters(model)] == [id(model[1].weight), id(model[3].weight)]
    optimizer = make_optimizer([(model.parameters(), 1e-3)], "muon", (0.9, 0.999), 0.0, model)
    tokens = torch.tensor([[1, 2, 3]])
    model[3](model[2](model[1](model[0](tokens))).mT).sum().backward()
    optimizer.step()
    kinds = {name: sorted(optimizer.state[p]) for name, p in model.named_parameters()}
    assert kinds["1.weight"] == kinds["3.weight"] == ["momentum_buffer"]
    assert kinds["0.weight"] == kinds["1.bias"] == kinds["2.weight"] == ["exp_avg", "exp_avg_sq", "step"]
    with pytest.raises(TypeError, match="needs the model"):
        make_optimizer([(model.parameters(), 1e-3)], "muon", (0.9, 0.999), 0.0)


def test_a_muon_run_resumes_bit_exactly_and_a_bad_name_is_refused(tmp_path, vae_dir):
    config, raw = ldm_config(tmp_path, optimizer="muon", max_steps=4, checkpoint_every=2, keep_checkpoints=0)
    run = train_ldm(config, tmp_path / "run", vae=vae_dir, raw=raw, progress=False)
    straight = run / "checkpoints/step-00000004"
    shutil.move(straight, tmp_path / "straight")
    train_ldm(config, run, vae=vae_dir, raw=raw, resume=True, progress=False)
    for name in ("unet", "text_encoder", "ema/unet"):
        assert_identical(weights(tmp_path / "straight", name), weights(straight, name))
    adamw, raw_adamw = ldm_config(tmp_path, max_steps=6, checkpoint_every=2)
    with pytest.raises(ConfigError, match="was trained with train.optimizer muon, this config sets adamw"):
        train_ldm(adamw, run, vae=vae_dir, raw=raw_adamw, resume=True, progress=False)
    with pytest.raises(ConfigError, match="train.optimizer must be one of adamw, muon, got 'sgd'"):
        ldm_config(tmp_path, optimizer="sgd")


def test_a_bare_no_in_yaml_is_mixed_precision_no(tmp_path):
    """YAML 1.1 reads `mixed_precision: no` as false; it means the documented "no"."""
    path = tmp_path / "ldm.yaml"
    path.write_text(yaml.safe_dump(TINY_LDM).replace("train:", "train:\n  mixed_precision: no", 1))
    assert load_run_config(LDMRunConfig, path)[0].train.mixed_precision == "no"
