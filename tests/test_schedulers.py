"""Schedulers: closed forms of the schedule math, and step-by-step parity with diffusers' DDPM/DDIM schedulers."""

import inspect
import itertools
import math

import diffusers
import pytest
import torch

from latentdiffusion.config import from_dict
from latentdiffusion.errors import ConfigError
from latentdiffusion.schedulers import (
    SCHEDULERS,
    DDIMScheduler,
    DDPMScheduler,
    Scheduler,
    SchedulerConfig,
    make_scheduler,
)
from latentdiffusion.schedulers.schedule import cosine_alpha_bar, make_alphas_cumprod, make_betas

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["leading", "trailing", "linspace"]
STEPS = 10  # 1000 // 10 is the true stride of every spacing's chain (linspace: see _reference)


def _reference(cls: type, cfg: SchedulerConfig):
    """diffusers scheduler `cls` with the same settings."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in vars(cfg).items() if k in accepted}
    return cls(**kwargs)


def _run_pair(ours: Scheduler, ref, cfg: SchedulerConfig, step_kwargs: dict) -> None:
    """Sample both schedulers with one fixed fake model output; every step must agree."""
    ours.set_timesteps(STEPS)
    ref.set_timesteps(STEPS)
    assert torch.equal(ours.timesteps, ref.timesteps)
    if isinstance(ref, diffusers.DDIMScheduler) and cfg.timestep_spacing == "linspace":
        # diffusers' DDIM steps t -> t - T // num_inference_steps for every spacing (diffusers issue #12633);
        # the linspace chain 999, 888, ..., 0 strides by 111 = 1000 // 9, so give the oracle that stride.
        ref.num_inference_steps = 9
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    model_output = torch.randn(2, 4, 8, 8, generator=gen)
    x_ours, x_ref = x.clone(), x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ours.timesteps:
        x_ours = ours.step(model_output, t, x_ours, generator=g_ours)
        x_ref = ref.step(model_output, t, x_ref, generator=g_ref, **step_kwargs).prev_sample
        torch.testing.assert_close(x_ours, x_ref, atol=1e-6, rtol=1e-6, msg=f"step at t={int(t)}")
    assert torch.isfinite(x_ours).all()


def _cases(*extra: list) -> list[tuple]:
    """schedule x prediction x spacing x zero-SNR x steps_offset x extra, without the meaningless combinations."""
    cases = []
    for schedule, pred, spacing, zero_snr, offset, *rest in itertools.product(
        BETA_SCHEDULES, PREDICTIONS, SPACINGS, [False, True], [0, 1], *extra
    ):
        if zero_snr and pred == "epsilon":  # alpha_bar_T = 0: no x0 from an eps prediction at the last step
            continue
        if offset and spacing != "leading":  # steps_offset only shifts the leading spacing
            continue
        cases.append((schedule, pred, spacing, zero_snr, offset, *rest))
    return cases


def _config(schedule, pred, spacing, zero_snr, offset, **kwargs) -> SchedulerConfig:
    return SchedulerConfig(
        beta_schedule=schedule,
        prediction_type=pred,
        timestep_spacing=spacing,
        rescale_betas_zero_snr=zero_snr,
        steps_offset=offset,
        **kwargs,
    )


# ---- parity with diffusers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule,pred,spacing,zero_snr,offset,variance_type",
    _cases(["fixed_small", "fixed_small_log", "fixed_large"]),
)
def test_ddpm_matches_diffusers(schedule, pred, spacing, zero_snr, offset, variance_type):
    cfg = _config(schedule, pred, spacing, zero_snr, offset, variance_type=variance_type)
    _run_pair(DDPMScheduler(cfg), _reference(diffusers.DDPMScheduler, cfg), cfg, {})


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_ddpm_fixed_large_log_is_fixed_large(pred):
    # diffusers' fixed_large_log takes sqrt(log(beta)) and gives NaN; ours is the same std as fixed_large
    cfg = SchedulerConfig(prediction_type=pred, variance_type="fixed_large_log")
    ref = _reference(diffusers.DDPMScheduler, SchedulerConfig(prediction_type=pred, variance_type="fixed_large"))
    _run_pair(DDPMScheduler(cfg), ref, cfg, {})


@pytest.mark.parametrize(
    "schedule,pred,spacing,zero_snr,offset,set_alpha_to_one,eta",
    # zero SNR with eta > 0 from t = 999: diffusers' sqrt(1 - a_prev - sigma^2) can go NaN; see the test below
    [c for c in _cases([False, True], [0.0, 1.0]) if not (c[3] and c[6] > 0 and c[2] != "leading")],
)
def test_ddim_matches_diffusers(schedule, pred, spacing, zero_snr, offset, set_alpha_to_one, eta):
    cfg = _config(schedule, pred, spacing, zero_snr, offset, set_alpha_to_one=set_alpha_to_one)
    _run_pair(DDIMScheduler(cfg, eta=eta), _reference(diffusers.DDIMScheduler, cfg), cfg, {"eta": eta})


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_clip_sample_matches_diffusers(sampler, pred):
    cfg = SchedulerConfig(prediction_type=pred, clip_sample=True, clip_sample_range=0.5)
    ref_cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[sampler]
    step_kwargs = {"eta": 1.0} if sampler == "ddim" else {}
    _run_pair(make_scheduler(sampler, cfg, **step_kwargs), _reference(ref_cls, cfg), cfg, step_kwargs)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_ddim_zero_snr_stochastic_first_step(schedule, pred):
    # At alpha_bar_T = 0 and eta = 1, eq. 16 gives sigma^2 = 1 - a_prev: the step is sqrt(a_prev) x0 + sigma z.
    cfg = SchedulerConfig(beta_schedule=schedule, prediction_type=pred, timestep_spacing="trailing",
                          rescale_betas_zero_snr=True)
    ours = DDIMScheduler(cfg, eta=1.0)
    ours.set_timesteps(STEPS)
    t, t_prev = ours.timesteps[:2]
    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    x0 = -out if pred == "v_prediction" else out  # v = -x0 when alpha_bar = 0
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a_prev = ours.alphas_cumprod[t_prev]
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * z
    got = ours.step(out, t, x, generator=torch.Generator().manual_seed(1))
    # eps's coefficient sqrt(1 - a_prev - sigma^2) is 0 in exact arithmetic; computed as diffusers does (which the
    # parity tests hold us to) float32 leaves sqrt(rounding) ~ 1e-3 of it, so a tolerance of that size here.
    torch.testing.assert_close(got, expected, atol=3e-3, rtol=0)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_uneven_chain_steps_to_the_next_timestep(spacing):
    # 7 steps over 1000: uneven strides. DDIM at eta=1 is DDPM with the posterior variance (DDIM section 4.1),
    # and diffusers' DDPM steps to the next timestep of the chain, so it is the oracle here.
    cfg = SchedulerConfig(timestep_spacing=spacing, set_alpha_to_one=True)
    ours = DDIMScheduler(cfg, eta=1.0)
    ours.set_timesteps(7)
    steps = ours.timesteps
    assert torch.equal(ours.alpha_bar_prev[steps[:-1]], ours.alphas_cumprod[steps[1:]])
    assert ours.alpha_bar_prev[steps[-1]] == 1.0
    ref = _reference(diffusers.DDPMScheduler, cfg)
    ref.set_timesteps(7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    out = torch.randn(2, 4, 8, 8, generator=gen)
    x_ours, x_ref = x.clone(), x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in steps:
        x_ours = ours.step(out, t, x_ours, generator=g_ours)
        x_ref = ref.step(out, t, x_ref, generator=g_ref).prev_sample
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)


def test_ddpm_full_chain_without_set_timesteps():
    cfg = SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ours, ref = DDPMScheduler(cfg), _reference(diffusers.DDPMScheduler, cfg)
    assert torch.equal(ours.timesteps, torch.arange(999, -1, -1))
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in (999, 998, 500):  # one step t -> t - 1 from anywhere
        a = ours.step(out, t, x, generator=torch.Generator().manual_seed(2))
        b = ref.step(out, t, x, generator=torch.Generator().manual_seed(2)).prev_sample
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers_for_every_step_count(spacing, offset):
    cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    ours, ref = DDIMScheduler(cfg), _reference(diffusers.DDIMScheduler, cfg)
    top = 999 if (spacing == "leading" and offset) else 1000  # leading 1000 steps + offset 1 would reach t=1000
    for n in range(1, top + 1):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.dtype == torch.int64 and len(ours.timesteps) == n
        # diffusers' trailing float arange sometimes yields n + 1 steps ending at t = -1 (e.g. n = 61); ours stops at n
        assert torch.equal(ours.timesteps, ref.timesteps[:n]), n


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_and_add_noise_match_diffusers(schedule, zero_snr):
    cfg = SchedulerConfig(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    ours, ref = DDPMScheduler(cfg), _reference(diffusers.DDPMScheduler, cfg)
    assert ours.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(ours.betas, ref.betas, atol=1e-7, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-7, rtol=0)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    v = SchedulerConfig(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction")
    torch.testing.assert_close(
        DDPMScheduler(v).training_target(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-6, rtol=0
    )


# ---- closed forms ----------------------------------------------------------------------------------------------


def test_linear_and_scaled_linear_betas():
    n, lo, hi = 1000, 1e-4, 0.02
    i = torch.arange(n, dtype=torch.float64)
    lin = make_betas(SchedulerConfig(beta_schedule="linear", beta_start=lo, beta_end=hi))
    torch.testing.assert_close(lin.double(), lo + (hi - lo) * i / (n - 1), atol=1e-8, rtol=1e-6)
    sc = make_betas(SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    expected = (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / (n - 1)) ** 2
    torch.testing.assert_close(sc.double(), expected, atol=1e-8, rtol=1e-6)
    assert sc[0].item() == pytest.approx(0.00085, rel=1e-6) and sc[-1].item() == pytest.approx(0.012, rel=1e-6)


def test_cosine_alpha_bar_closed_form():
    n = 1000
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cosine_alpha_bar(torch.tensor([0.3], dtype=torch.float64)).item() == pytest.approx(f(0.3), rel=1e-12)
    betas = make_betas(SchedulerConfig(beta_schedule="squaredcos_cap_v2"))
    assert betas.max().item() == pytest.approx(0.999) and betas[-1].item() == pytest.approx(0.999)
    alpha_bar = make_alphas_cumprod(SchedulerConfig(beta_schedule="squaredcos_cap_v2"))
    expected = torch.tensor([f((t + 1) / n) / f(0) for t in range(n - 1)], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar[: n - 1].double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_zero_terminal_snr(schedule):
    plain = make_alphas_cumprod(SchedulerConfig(beta_schedule=schedule)).double()
    rescaled = make_alphas_cumprod(SchedulerConfig(beta_schedule=schedule, rescale_betas_zero_snr=True)).double()
    assert rescaled[-1] == 0.0
    assert rescaled[0].sqrt().item() == pytest.approx(plain[0].sqrt().item(), rel=1e-6)
    # Algorithm 1 maps sqrt(alpha_bar) affinely: (s - s_T) * s_0 / (s_0 - s_T)
    s = plain.sqrt()
    expected = (s - s[-1]) * s[0] / (s[0] - s[-1])
    torch.testing.assert_close(rescaled.sqrt(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("t", [torch.tensor([3, 250, 999]), 600, torch.tensor(42)])
def test_add_noise_closed_form(t):
    sched = DDPMScheduler(SchedulerConfig())
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    ab = sched.alphas_cumprod[torch.as_tensor(t)].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


@pytest.mark.parametrize(  # no zero SNR with epsilon: an eps prediction carries no x0 at alpha_bar = 0
    "pred,zero_snr", [(p, z) for p in PREDICTIONS for z in (False, True) if not (z and p == "epsilon")]
)
def test_training_target_round_trip(pred, zero_snr):
    sched = DDIMScheduler(SchedulerConfig(prediction_type=pred, rescale_betas_zero_snr=zero_snr))
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 100, 700, 999])
    target = sched.training_target(x0, noise, t)
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    closed = {"epsilon": noise, "sample": x0, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[pred]
    torch.testing.assert_close(target, closed)
    x0_hat, eps_hat = sched.predict_x0_eps(target, t, sched.add_noise(x0, noise, t))
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, noise, atol=1e-4, rtol=1e-4)


def test_dtypes_and_batched_timesteps():
    sched = DDPMScheduler(SchedulerConfig())
    sched.set_timesteps(5)
    x = torch.randn(2, 4, 8, 8)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        assert sched.add_noise(xd, xd, torch.tensor([1, 2])).dtype == dtype
        assert sched.training_target(xd, xd, 3).dtype == dtype
        assert sched.step(xd, sched.timesteps[0], xd, generator=torch.Generator().manual_seed(0)).dtype == dtype
    # a (B,) timestep steps each sample as if it were alone (DDIM, eta = 0: no noise to line up)
    ddim = DDIMScheduler(SchedulerConfig(prediction_type="v_prediction"))
    ddim.set_timesteps(5)
    out = torch.randn_like(x)
    ts = ddim.timesteps[:2]
    both = ddim.step(out, ts, x)
    for b in range(2):
        torch.testing.assert_close(both[b : b + 1], ddim.step(out[b : b + 1], ts[b], x[b : b + 1]))
    assert not torch.allclose(both[1:], ddim.step(out[1:], ts[0], x[1:]))
    assert sched.scale_model_input(x, 5) is x and sched.init_noise_sigma == 1.0


def test_ddpm_adds_no_noise_at_t0():
    sched = DDPMScheduler(SchedulerConfig(timestep_spacing="linspace", variance_type="fixed_large"))
    sched.set_timesteps(4)
    assert sched.timesteps[-1] == 0
    x, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    a = sched.step(out, 0, x, generator=torch.Generator().manual_seed(0))
    b = sched.step(out, 0, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = sched.step(out, 333, x, generator=torch.Generator().manual_seed(0))
    d = sched.step(out, 333, x, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(c, d)


def test_one_generator_per_sample():
    sched = DDPMScheduler(SchedulerConfig())
    sched.set_timesteps(10)
    x, out = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = sched.timesteps[2]
    both = sched.step(out, t, x, generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    second = sched.step(out[1:], t, x[1:], generator=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(both[1:], second)


def test_ddim_eta0_is_deterministic():
    sched = DDIMScheduler(SchedulerConfig(), eta=0.0)
    sched.set_timesteps(10)
    x, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    t = sched.timesteps[3]
    assert torch.equal(sched.step(out, t, x), sched.step(out, t, x, generator=torch.Generator().manual_seed(5)))


# ---- errors ----------------------------------------------------------------------------------------------------


def test_make_scheduler():
    assert set(SCHEDULERS) == {"ddim", "ddpm"}
    ddim = make_scheduler("ddim", SchedulerConfig(), eta=0.5)
    assert isinstance(ddim, DDIMScheduler) and ddim.eta == 0.5
    assert isinstance(make_scheduler("ddpm", SchedulerConfig()), DDPMScheduler)
    with pytest.raises(ConfigError, match="euler.*ddim, ddpm"):
        make_scheduler("euler", SchedulerConfig())
    with pytest.raises(ConfigError, match="eta"):
        make_scheduler("ddpm", SchedulerConfig(), eta=0.5)
    with pytest.raises(ConfigError, match="eta"):
        DDIMScheduler(SchedulerConfig(), eta=-1.0)


@pytest.mark.parametrize(
    "key,value",
    [
        ("beta_schedule", "cubic"),
        ("prediction_type", "noise"),
        ("timestep_spacing", "uniform"),
        ("variance_type", "learned"),
        ("num_train_timesteps", 0),
        ("beta_start", -0.1),
        ("beta_end", 1.5),
        ("steps_offset", -1),
        ("clip_sample_range", 0.0),
    ],
)
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        SchedulerConfig(**{key: value})
    with pytest.raises(ConfigError, match=key):
        from_dict(SchedulerConfig, {key: value}, "scheduler")


def test_bad_inference_steps():
    sched = DDIMScheduler(SchedulerConfig())
    for n in (0, 1001):
        with pytest.raises(ConfigError, match="num_inference_steps"):
            sched.set_timesteps(n)
    with pytest.raises(ConfigError, match="steps_offset"):
        sched.set_timesteps(1000)  # leading with steps_offset=1 would start at t=1000
