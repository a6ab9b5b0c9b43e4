"""Schedule math (closed forms, diffusers' alphas_cumprod / add_noise / timesteps) and the DDIM / DDPM samplers,
re-expressed in sigma space, step by step against diffusers' DDIMScheduler / DDPMScheduler."""

import inspect
import itertools
import math

import diffusers
import pytest
import torch

from latentdiffusion.config import from_dict
from latentdiffusion.errors import ConfigError
from latentdiffusion.samplers import SAMPLERS, Denoiser, input_scale, sampler_entry
from latentdiffusion.samplers.levels import ancestral_step, vp_to_k_scale
from latentdiffusion.schedulers import NoiseSchedule, SchedulerConfig, inference_timesteps
from latentdiffusion.schedulers.schedule import cosine_alpha_bar, make_alphas_cumprod, make_betas

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["leading", "trailing", "linspace"]
STEPS = 10  # 1000 // 10 is the true stride of every spacing's chain (linspace: see _run_pair)


def _reference(cls: type, cfg: SchedulerConfig):
    """diffusers scheduler `cls` with the same settings."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in cfg.given().items() if k in accepted}  # left out: the class default
    return cls(**kwargs)


def _sample_steps(name: str, cfg: SchedulerConfig, x: torch.Tensor, model_output: torch.Tensor, steps: int = STEPS,
                  generator=None, **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run sampler `name` on a model that always outputs `model_output`, from the variance-preserving x at the
    first timestep; returns the timesteps and every step's x converted back to the variance-preserving scale."""
    entry = SAMPLERS[name]
    levels = entry.levels(cfg, steps, False)
    denoiser = Denoiser(lambda x_in, t: model_output, cfg, levels)
    xs = []
    entry.function(denoiser, x * vp_to_k_scale(float(levels.sigmas[0])), levels.sigmas, generator=generator,
                   callback=lambda i, sigma_next, xk: xs.append(xk * input_scale(sigma_next)),
                   **{**entry.options(cfg, levels), **options})
    return levels.timesteps.long(), xs


def _run_pair(name: str, ref, cfg: SchedulerConfig, step_kwargs: dict, tol: float = 2e-6) -> None:
    """Sample ours and the reference with one fixed fake model output; every step must agree to float32 rounding
    of the step's scale (a fixed output drives x far from unit scale; the sigma-space round trip rounds there).
    The reference computes its coefficients in float64 from its own float32 alphas_cumprod: in float32 its sqrt(1 - a_prev - sigma^2) of
    eta > 0 cancels catastrophically near alpha_bar = 0 (about 1e-4 off on the cosine schedule), where ours is exact."""
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    for name_ in ("final_alpha_cumprod", "one"):
        if hasattr(ref, name_):
            setattr(ref, name_, getattr(ref, name_).double())
    ref.set_timesteps(STEPS)
    if isinstance(ref, diffusers.DDIMScheduler) and SAMPLERS[name].config(cfg).timestep_spacing == "linspace":
        # diffusers' DDIM steps t -> t - T // num_inference_steps for every spacing (diffusers issue #12633);
        # the linspace chain 999, 888, ..., 0 strides by 111 = 1000 // 9, so give the oracle that stride.
        ref.num_inference_steps = 9
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    model_output = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps, ours = _sample_steps(name, cfg, x, model_output, generator=torch.Generator().manual_seed(1),
                                    **step_kwargs)
    assert torch.equal(timesteps, ref.timesteps)
    x_ref, g_ref = x.clone(), torch.Generator().manual_seed(1)
    for t, x_ours in zip(ref.timesteps, ours):
        x_ref = ref.step(model_output, t, x_ref, generator=g_ref, **step_kwargs).prev_sample
        error, scale = (x_ours - x_ref).abs().max().item(), max(x_ref.abs().max().item(), 1.0)
        assert error <= tol * scale, f"step at t={int(t)}: {error} > {tol} * {scale}"
    assert len(ours) == STEPS and torch.isfinite(ours[-1]).all()


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
    _run_pair("ddpm", _reference(diffusers.DDPMScheduler, cfg), cfg, {})


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_ddpm_fixed_large_log_is_fixed_large(pred):
    # diffusers' fixed_large_log takes sqrt(log(beta)) and gives NaN; ours is the same std as fixed_large
    cfg = SchedulerConfig(prediction_type=pred, variance_type="fixed_large_log")
    ref = _reference(diffusers.DDPMScheduler, SchedulerConfig(prediction_type=pred, variance_type="fixed_large"))
    _run_pair("ddpm", ref, cfg, {})


@pytest.mark.parametrize(
    "schedule,pred,spacing,zero_snr,offset,set_alpha_to_one,eta",
    # zero SNR with eta > 0 from t = 999: diffusers' sqrt(1 - a_prev - sigma^2) can go NaN; see the test below
    [c for c in _cases([False, True], [0.0, 1.0]) if not (c[3] and c[6] > 0 and c[2] != "leading")],
)
def test_ddim_matches_diffusers(schedule, pred, spacing, zero_snr, offset, set_alpha_to_one, eta):
    cfg = _config(schedule, pred, spacing, zero_snr, offset, set_alpha_to_one=set_alpha_to_one)
    _run_pair("ddim", _reference(diffusers.DDIMScheduler, cfg), cfg, {"eta": eta})


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_clip_sample_matches_diffusers(sampler, pred):
    cfg = SchedulerConfig(prediction_type=pred, clip_sample=True, clip_sample_range=0.5)
    ref_cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[sampler]
    step_kwargs = {"eta": 1.0} if sampler == "ddim" else {}
    _run_pair(sampler, _reference(ref_cls, cfg), cfg, step_kwargs)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_ddim_zero_snr_stochastic_first_step(schedule, pred):
    # At alpha_bar_T = 0 and eta = 1, eq. 16 gives sigma^2 = 1 - a_prev: the step is sqrt(a_prev) x0 + sigma z.
    cfg = SchedulerConfig(beta_schedule=schedule, prediction_type=pred, timestep_spacing="trailing",
                          rescale_betas_zero_snr=True)
    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    timesteps, xs = _sample_steps("ddim", cfg, x, out, generator=torch.Generator().manual_seed(1), eta=1.0)
    x0 = -out if pred == "v_prediction" else out  # v = -x0 when alpha_bar = 0
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a_prev = make_alphas_cumprod(cfg)[timesteps[1]]
    # exact in sigma space (diffusers' float32 sqrt(1 - a_prev - sigma^2) leaves ~1e-3 of eps here)
    torch.testing.assert_close(xs[0], a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * z, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_uneven_chain_steps_to_the_next_timestep(spacing):
    # 7 steps over 1000: uneven strides. DDIM at eta=1 is DDPM with the posterior variance (DDIM section 4.1),
    # and diffusers' DDPM steps to the next timestep of the chain, so it is the oracle here.
    cfg = SchedulerConfig(timestep_spacing=spacing, set_alpha_to_one=True)
    ref = _reference(diffusers.DDPMScheduler, cfg)
    ref.set_timesteps(7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    out = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps, xs = _sample_steps("ddim", cfg, x, out, steps=7, generator=torch.Generator().manual_seed(1), eta=1.0)
    assert torch.equal(timesteps, ref.timesteps)
    x_ref, g_ref = x.clone(), torch.Generator().manual_seed(1)
    for t, x_ours in zip(timesteps, xs):
        x_ref = ref.step(out, t, x_ref, generator=g_ref).prev_sample
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers_for_every_step_count(spacing, offset):
    cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    ref = _reference(diffusers.DDIMScheduler, cfg)
    top = 999 if (spacing == "leading" and offset) else 1000  # leading 1000 steps + offset 1 would reach t=1000
    for n in range(1, top + 1):
        ours = inference_timesteps(cfg, n)
        ref.set_timesteps(n)
        assert ours.dtype == torch.int64 and len(ours) == n
        # diffusers' trailing float arange sometimes yields n + 1 steps ending at t = -1 (e.g. n = 61); ours stops at n
        assert torch.equal(ours, ref.timesteps[:n]), n


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_and_add_noise_match_diffusers(schedule, zero_snr):
    cfg = SchedulerConfig(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    ours, ref = NoiseSchedule(cfg), _reference(diffusers.DDPMScheduler, cfg)
    assert ours.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(ours.betas, ref.betas, atol=1e-7, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-7, rtol=0)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    v = SchedulerConfig(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction")
    torch.testing.assert_close(
        NoiseSchedule(v).training_target(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-6, rtol=0
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
    sched = NoiseSchedule(SchedulerConfig())
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    ab = sched.alphas_cumprod[torch.as_tensor(t)].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


@pytest.mark.parametrize(  # no zero SNR with epsilon: an eps prediction carries no x0 at alpha_bar = 0
    "pred,zero_snr", [(p, z) for p in PREDICTIONS for z in (False, True) if not (z and p == "epsilon")]
)
def test_training_target_round_trip(pred, zero_snr):
    sched = NoiseSchedule(SchedulerConfig(prediction_type=pred, rescale_betas_zero_snr=zero_snr))
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
    sched = NoiseSchedule(SchedulerConfig())
    x = torch.randn(2, 4, 8, 8)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        assert sched.add_noise(xd, xd, torch.tensor([1, 2])).dtype == dtype
        assert sched.training_target(xd, xd, 3).dtype == dtype
    # a (B,) timestep noises each sample as if it were alone
    t = torch.tensor([10, 900])
    both = sched.add_noise(x, x, t)
    for b in range(2):
        torch.testing.assert_close(both[b : b + 1], sched.add_noise(x[b : b + 1], x[b : b + 1], t[b]))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_keep_dtype(sampler):
    out = torch.randn(1, 4, 4, 4)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        _, xs = _sample_steps(sampler, SchedulerConfig(), out.to(dtype), out.to(dtype), steps=3,
                              generator=torch.Generator().manual_seed(0))
        assert xs[-1].dtype == dtype


def test_ddpm_adds_no_noise_on_the_last_step_from_t0():
    cfg = SchedulerConfig(timestep_spacing="linspace", variance_type="fixed_large")
    x, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    runs = [_sample_steps("ddpm", cfg, x, out, steps=4, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert runs[0][0][-1] == 0
    assert not torch.allclose(runs[0][1][-2], runs[1][1][-2])  # noise on the steps before ...
    last = [SAMPLERS["ddpm"].options(cfg, SAMPLERS["ddpm"].levels(cfg, 4, False))["last_step_noise"]]
    assert last == [False]  # ... none on the one from t = 0, which diffusers' parity (linspace cases) also holds


def test_one_generator_per_sample():
    x, out = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    _, both = _sample_steps("ddpm", SchedulerConfig(), x, out, steps=3, generator=gens)
    _, second = _sample_steps("ddpm", SchedulerConfig(), x[1:], out[1:], steps=3,
                              generator=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(both[-1][1:], second[-1])


def test_ddim_eta0_is_deterministic():
    x, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    a = _sample_steps("ddim", SchedulerConfig(), x, out, generator=None)[1][-1]
    b = _sample_steps("ddim", SchedulerConfig(), x, out, generator=torch.Generator().manual_seed(5))[1][-1]
    assert torch.equal(a, b)


def test_ancestral_step_closed_form():
    # sigma_down^2 + sigma_up^2 = sigma_next^2; eta = 1 is DDIM eq. 16 rescaled to sigma space; inf sigma is the limit
    for sigma, nxt, eta in ((10.0, 2.0, 1.0), (3.0, 1.5, 0.5), (math.inf, 4.0, 1.0), (5.0, 0.0, 1.0)):
        down, up = ancestral_step(sigma, nxt, eta)
        assert down**2 + up**2 == pytest.approx(nxt**2)
        a, a_prev = 1 / (1 + sigma**2), 1 / (1 + nxt**2)
        ddim_sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        assert up == pytest.approx(ddim_sigma / math.sqrt(a_prev), abs=1e-12)
    assert ancestral_step(3.0, 1.0, 0.0) == (1.0, 0.0)


# ---- errors ----------------------------------------------------------------------------------------------------


def test_sampler_entry_names_the_culprit():
    assert {"ddim", "ddpm", "euler", "euler_ancestral", "heun"} <= set(SAMPLERS)
    assert sampler_entry("euler", use_karras_sigmas=True) is SAMPLERS["euler"]
    with pytest.raises(ConfigError, match="euler-magic.*ddim, ddpm"):
        sampler_entry("euler-magic")
    with pytest.raises(ConfigError, match="use_karras_sigmas.*ddim"):
        sampler_entry("ddim", use_karras_sigmas=True)


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
    leading = SchedulerConfig(timestep_spacing="leading")
    for n in (0, 1001):
        with pytest.raises(ConfigError, match="num_inference_steps"):
            inference_timesteps(leading, n)
    with pytest.raises(ConfigError, match="steps_offset"):
        inference_timesteps(leading, 1000)  # leading with steps_offset=1 would start at t=1000
