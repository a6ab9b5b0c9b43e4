"""DPM-Solver++(2M), its SDE variant, UniPC and LMS: the whole sampling loop against diffusers' schedulers of the same
algorithm, driven by one deterministic toy model, in their own loop (as StableDiffusionPipeline runs it)."""

import inspect

import diffusers
import pytest
import torch

from latentdiffusion.errors import ConfigError
from latentdiffusion.samplers import SAMPLERS, Denoiser, sampler_entry
from latentdiffusion.samplers.lms import lms_coefficients
from latentdiffusion.schedulers import SchedulerConfig

STEPS = 10
SHAPE = (2, 4, 8, 8)
NAMES = ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "lms"]
# the diffusers scheduler settings that select each algorithm (beyond the class SAMPLERS[name].reference names)
REFERENCE_SETTINGS = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    "unipc": {},
    "lms": {},
}


class ToyModel:
    """A fixed random map (x_in (B,C,h,w), t) -> eps or v: a channel mix of x_in, a tanh and a timestep term."""

    def __init__(self, channels: int = SHAPE[1], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.eye(channels) + 0.2 * torch.randn(channels, channels, generator=g) / channels**0.5
        self.b = 0.1 * torch.randn(channels, 1, 1, generator=g)

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        mixed = (self.w[None, :, :, None, None] * x_in[:, None]).sum(2)  # channel mix (B,C,h,w)
        return mixed + 0.3 * torch.tanh(mixed) * torch.cos(t / 300.0) + self.b * torch.sin(t / 100.0)


def reference(name: str, cfg: SchedulerConfig, karras: bool):
    cls, extra = getattr(diffusers, SAMPLERS[name].reference), REFERENCE_SETTINGS[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in cfg.given().items() if k in accepted}  # left out: the class default
    if karras:
        kwargs["use_karras_sigmas"] = True
    return cls(**kwargs, **extra)


def run_both(name: str, cfg: SchedulerConfig, karras: bool, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    entry = SAMPLERS[name]
    model = ToyModel()
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))

    ref = reference(name, cfg, karras)
    ref.set_timesteps(steps)
    x_ref = latents * ref.init_noise_sigma
    g_ref = torch.Generator().manual_seed(2)
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    for t in ref.timesteps:
        out = model(ref.scale_model_input(x_ref, t), t)
        kwargs = {"generator": g_ref} if takes_generator else {}
        x_ref = ref.step(out, t, x_ref, **kwargs).prev_sample

    levels = entry.levels(cfg, steps, karras)
    torch.testing.assert_close(levels.sigmas, ref.sigmas.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(levels.timesteps, ref.timesteps.double(), rtol=1e-6, atol=1e-4)
    x = latents * levels.init_noise_sigma  # diffusers' multistep solvers work on x_t: x = x_t sqrt(1 + sigma^2)
    x = entry.function(Denoiser(model, cfg, levels), x, levels.sigmas, generator=torch.Generator().manual_seed(2))
    return x, x_ref


def assert_relative(x: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    err = float((x - ref).abs().max() / ref.abs().max())
    assert err <= tol, f"max |ours - diffusers| / max |diffusers| = {err:.2e}"


CASES = [
    (name, pred, spacing, karras)
    for name in NAMES
    for pred in ("epsilon", "v_prediction")
    for spacing in ("leading", "trailing", "linspace")
    for karras in (False, True)
]


@pytest.mark.parametrize("name,pred,spacing,karras", CASES)
def test_matches_diffusers(name, pred, spacing, karras):
    cfg = SchedulerConfig(prediction_type=pred, timestep_spacing=spacing)
    x, x_ref = run_both(name, cfg, karras)
    assert torch.isfinite(x).all()
    assert_relative(x, x_ref)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
@pytest.mark.parametrize("spacing,karras", [("trailing", False), ("linspace", False), ("trailing", True)])
def test_zero_terminal_snr_matches_diffusers(name, spacing, karras):
    cfg = SchedulerConfig(prediction_type="v_prediction", timestep_spacing=spacing, rescale_betas_zero_snr=True)
    x, x_ref = run_both(name, cfg, karras)
    assert_relative(x, x_ref)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("schedule,pred", [("linear", "sample"), ("squaredcos_cap_v2", "epsilon")])
def test_other_schedules_and_sample_prediction(name, schedule, pred):
    cfg = SchedulerConfig(beta_schedule=schedule, prediction_type=pred, steps_offset=0, timestep_spacing="linspace")
    # the cosine schedule's Karras timesteps repeat (998, 998, ...), which diffusers' step-index lookup cannot run
    for karras in (False, True) if schedule != "squaredcos_cap_v2" else (False,):
        x, x_ref = run_both(name, cfg, karras, steps=7)
        assert_relative(x, x_ref)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [5, 20])
def test_cosine_karras_schedule_matches_diffusers(name, steps):
    cfg = SchedulerConfig(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", steps_offset=0)
    ref = reference(name, cfg, karras=True)
    ref.set_timesteps(steps)
    levels = SAMPLERS[name].levels(cfg, steps, True)
    sigmas, timesteps = levels.sigmas, levels.timesteps
    torch.testing.assert_close(sigmas, ref.sigmas.double(), rtol=1e-6, atol=0)
    # its sigma -> timestep interpolation runs on a float32 log-sigma table, whose rounding moves some of these
    # nearly equal sigmas (1000 training timesteps within 0.1% of sigma_max) to the neighbouring timestep
    assert (timesteps - ref.timesteps.double()).abs().max() <= 1


def test_lms_coefficients_integrate_polynomials_exactly():
    # an order-k Adams-Bashforth step integrates any polynomial of degree < k exactly: f = tau^2 + 3 over [s1, s0]
    sigmas = torch.tensor([9.0, 6.5, 4.0, 2.5, 1.0], dtype=torch.float64)
    c = lms_coefficients(sigmas, 3, 3)
    values = [float(sigmas[3 - k]) ** 2 + 3 for k in range(3)]
    exact = ((1.0**3 / 3 + 3 * 1.0) - (2.5**3 / 3 + 3 * 2.5))
    assert abs(sum(ci * vi for ci, vi in zip(c, values)) - exact) < 1e-12


def test_callback_replaces_x():
    cfg = SchedulerConfig()
    seen = []

    def callback(i, sigma_next, x):
        seen.append((i, sigma_next))
        return torch.zeros_like(x) if i == 3 else None

    for name in NAMES:
        levels = SAMPLERS[name].levels(cfg, 4, False)
        seen.clear()
        x = SAMPLERS[name].function(Denoiser(ToyModel(), cfg, levels), torch.randn(SHAPE), levels.sigmas,
                                    generator=torch.Generator().manual_seed(0), callback=callback)
        assert seen == [(i, float(levels.sigmas[i + 1])) for i in range(4)]
        assert torch.equal(x, torch.zeros(SHAPE))


def test_lms_refuses_zero_snr():
    with pytest.raises(ConfigError, match="rescale_betas_zero_snr"):
        SAMPLERS["lms"].levels(SchedulerConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction"), 10, False)


def test_registry_takes_karras_for_each():
    for name in NAMES:
        assert sampler_entry(name, use_karras_sigmas=True) is SAMPLERS[name]


@pytest.mark.parametrize("name", ["dpmpp_2m", "lms"])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_levels_match_diffusers_for_many_step_counts(name, spacing, offset):
    cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    ref = reference(name, cfg, karras=False)
    for steps in [*range(1, 31), 49, 50, 100, 250, 998]:
        ref.set_timesteps(steps)
        levels = SAMPLERS[name].levels(cfg, steps, False)
        # diffusers' trailing float arange sometimes yields n + 1 steps ending at t = -1 (e.g. n = 998); ours stops at n
        torch.testing.assert_close(levels.timesteps, ref.timesteps[:steps].double(), rtol=0, atol=1e-4)
        torch.testing.assert_close(levels.sigmas[:-1], ref.sigmas[:steps].double(), rtol=1e-6, atol=0)
        # diffusers' LMS scales the latents into its own scale; its DPM-Solver works on x_t (scale 1)
        scale = float(ref.init_noise_sigma) * (1.0 if name == "lms" else (1 + float(ref.sigmas[0]) ** 2) ** 0.5)
        assert levels.init_noise_sigma == pytest.approx(scale, rel=1e-6)


@pytest.mark.parametrize("karras", [False, True])
def test_bad_step_count_names_the_argument(karras):
    for name in NAMES:
        for steps in (0, 1001, 2.5):
            with pytest.raises(ConfigError, match="num_inference_steps"):
                SAMPLERS[name].levels(SchedulerConfig(steps_offset=0), steps, karras)
