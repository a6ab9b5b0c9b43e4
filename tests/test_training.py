"""Training: the loss falls, a SIGKILLed run resumes bit-identically, two gloo processes make the same update as one,
checkpoints are atomic and load directly, non-finite losses never reach a file. Tiny models at 16x16."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from latentdiffusion import LatentDiffusion
from latentdiffusion.errors import ConfigError
from latentdiffusion.formats import load_vae
from latentdiffusion.formats.components import Components
from latentdiffusion.formats.native import list_checkpoints, save_components
from latentdiffusion.pipeline import LatentDiffusion as Pipeline
from latentdiffusion.training import (LDMRunConfig, NonFiniteLossError, VAERunConfig, load_run_config, train_ldm,
                                      train_vae)
from latentdiffusion.training.batches import BatchOrder
from latentdiffusion.training.checkpoint import STATE_FILE, clean_leftovers, load_state, write_checkpoint
from latentdiffusion.training.vae_losses import PatchDiscriminator
from latentdiffusion.vae import AutoencoderKL, VAEConfig
from tiny import TINY_LDM, TINY_VAE, one_thread  # noqa: F401  (one_thread: a module fixture)

TINY_VAE_RUN = {
    "model": {"vae": {"block_channels": [16, 32], "layers_per_block": 1, "norm_groups": 8}},
    "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "disc_start": 2, "disc_channels": 8,
              "disc_layers": 2, "checkpoint_every": 2, "log_every": 1, "sample_every": 2, "scale_batches": 1,
              "sample_images": 2, "device": "cpu"},
    "data": {"source": "builtin:shapes", "resolution": 16},
}
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny random VAE (factor 2: 16x16 images <-> 8x8x4 latents) as a model folder."""
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE)
    save_components(folder, Components(configs={"vae": TINY_VAE}, weights={"vae": vae.state_dict()}))
    return folder


def write_config(path: Path, base: dict, **train) -> Path:
    """A YAML config: `base` with some train values replaced."""
    data = {**base, "train": {**base["train"], **train}}
    path.write_text(yaml.safe_dump(data))
    return path


def ldm_config(tmp_path: Path, **train) -> tuple[LDMRunConfig, dict]:
    return load_run_config(LDMRunConfig, write_config(tmp_path / "ldm.yaml", TINY_LDM, **train))


def weights(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / f"{name}.safetensors")


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_ldm_loss_falls_and_run_folder_samples_directly(tmp_path, vae_dir):
    config, raw = ldm_config(tmp_path, max_steps=40, batch_size=8, learning_rate=2e-3, checkpoint_every=20,
                             caption_dropout=0.1, sample_every=40, sample_steps=2,
                             validation_prompts=["a red circle", "a blue square"])
    run = train_ldm(config, tmp_path / "run", vae=vae_dir, raw=raw, progress=False)
    losses = [r["loss"] for r in metrics(run)]
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert (run / "loss.png").is_file() and (run / "samples" / "step-00000040.png").is_file()

    # A run folder is a model: its newest checkpoint, EMA weights first (raw weights on request).
    newest = list_checkpoints(run)[-1][1]
    assert newest.name == "step-00000040"
    pipe = LatentDiffusion.from_pretrained(run)
    assert_identical(pipe.unet.state_dict(), weights(newest / "ema", "unet"))
    raw_pipe = LatentDiffusion.from_pretrained(newest, use_ema=False)
    assert_identical(raw_pipe.unet.state_dict(), weights(newest, "unet"))
    assert not torch.equal(raw_pipe.unet.conv_out.weight, pipe.unet.conv_out.weight)
    images = pipe("a red circle", num_inference_steps=2, output_type="pt")
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_vae_loss_falls_with_discriminator_and_resumes_exactly(tmp_path):
    config, raw = load_run_config(VAERunConfig, write_config(tmp_path / "vae.yaml", TINY_VAE_RUN))
    full = train_vae(config, tmp_path / "full", raw=raw, progress=False)
    records = metrics(full)
    assert records[-1]["d_loss"] > 0 and "g_loss" in records[-1] and "g_loss" not in records[0]
    assert (full / "samples" / "step-00000002.png").is_file()
    vae = load_vae(full)  # the run folder works as --vae, with a scaling factor measured from data
    assert vae.config.scaling_factor != VAEConfig().scaling_factor and vae.config.sample_size == 16

    short, raw_short = load_run_config(VAERunConfig, write_config(tmp_path / "short.yaml", TINY_VAE_RUN, max_steps=2))
    train_vae(short, tmp_path / "split", raw=raw_short, progress=False)
    train_vae(config, tmp_path / "split", raw=raw, resume=True, progress=False)  # continues to 4
    for step in ("step-00000004",):
        assert_identical(weights(full / "checkpoints" / step, "vae"), weights(tmp_path / "split/checkpoints" / step, "vae"))
    state_a, state_b = (load_state(r / "checkpoints" / "step-00000004") for r in (full, tmp_path / "split"))
    assert_identical(state_a["discriminator"], state_b["discriminator"])
    assert [r["step"] for r in metrics(tmp_path / "split")] == [1, 2, 3, 4]

    losses = [r["rec_loss"] for r in train_curve(tmp_path)]
    assert losses[-1] < 0.7 * losses[0], f"reconstruction loss did not fall: {losses}"


def test_vae_from_scratch_starts_its_posterior_at_logvar_init(tmp_path):
    config, raw = load_run_config(VAERunConfig, write_config(
        tmp_path / "vae.yaml", TINY_VAE_RUN, max_steps=1, checkpoint_every=1, sample_every=0, logvar_init=-8.0))
    vae = load_vae(train_vae(config, tmp_path / "run", raw=raw, progress=False))
    bias = vae.quant_conv.bias
    assert (bias[4:] + 8.0).abs().max() <= 2e-3  # one Adam step (lr 1e-3) away from -8
    assert bias[:4].abs().max() < 1.0  # the mean half keeps PyTorch's init
    with torch.no_grad():
        std = vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).std
    assert std.max() < 0.1  # posterior noise starts small, not at ~1


def test_vae_l2_weight_adds_the_squared_error_linearly(tmp_path):
    """Same seed, same first batch: the logged loss grows by l2_weight times one fixed, positive squared error."""
    def first_rec_loss(weight: float) -> float:
        config, raw = load_run_config(VAERunConfig, write_config(
            tmp_path / f"vae-{weight}.yaml", TINY_VAE_RUN, max_steps=1, checkpoint_every=1, sample_every=0,
            disc_start=10, l2_weight=weight))
        return metrics(train_vae(config, tmp_path / f"run-{weight}", raw=raw, progress=False))[0]["rec_loss"]

    base, one, three = first_rec_loss(0.0), first_rec_loss(1.0), first_rec_loss(3.0)
    assert one - base > 1e-3
    assert three - base == pytest.approx(3 * (one - base), rel=1e-4)
    with pytest.raises(ConfigError, match="l2_weight"):
        load_run_config(VAERunConfig, write_config(tmp_path / "bad.yaml", TINY_VAE_RUN, l2_weight=-1.0))


def test_vae_decoder_only_keeps_the_encoder_and_its_scale_bit_exactly(tmp_path, vae_dir):
    """train.decoder_only: the decoder learns, the encoder, quant_conv and scaling_factor stay the --init VAE's (so
    models trained on its latents still fit); without --init it is refused."""
    run_yaml = {key: value for key, value in TINY_VAE_RUN.items() if key != "model"}  # the architecture is --init's
    config, raw = load_run_config(VAERunConfig, write_config(
        tmp_path / "vae.yaml", run_yaml, max_steps=2, disc_start=1, decoder_only=True, ema_decay=0.9))
    run = train_vae(config, tmp_path / "run", init=vae_dir, raw=raw, progress=False)
    before = weights(vae_dir, "vae")
    for folder in (run / "checkpoints" / "step-00000002", run / "checkpoints" / "step-00000002" / "ema"):
        after = weights(folder, "vae")
        kept = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
        assert kept and all(torch.equal(before[k], after[k]) for k in kept)
        assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
        assert load_vae(folder).config.scaling_factor == TINY_VAE.scaling_factor
    with pytest.raises(ConfigError, match="decoder_only.*--init"):
        train_vae(config, tmp_path / "scratch", raw=raw, progress=False)


def test_vae_init_takes_model_keys_that_say_what_it_is_and_names_one_that_differs(tmp_path, vae_dir):
    """`ldm train-vae --config vae-tiny --init <a vae-tiny run> --set train.decoder_only=true`: the config's model.vae
    keys equal the --init VAE's, so it trains; a key that would change the architecture is refused, with both values."""
    config, raw = load_run_config(VAERunConfig, write_config(
        tmp_path / "vae.yaml", TINY_VAE_RUN, max_steps=1, decoder_only=True, sample_every=0, disc_start=10))
    run = train_vae(config, tmp_path / "run", init=vae_dir, raw=raw, progress=False)
    assert load_vae(run).config == TINY_VAE
    other = {**TINY_VAE_RUN, "model": {"vae": {**TINY_VAE_RUN["model"]["vae"], "layers_per_block": 2}}}
    config, raw = load_run_config(VAERunConfig, write_config(tmp_path / "other.yaml", other, decoder_only=True))
    with pytest.raises(ConfigError, match=r"'model.vae.layers_per_block' \(2\) conflicts with --init's \(1\)"):
        train_vae(config, tmp_path / "other", init=vae_dir, raw=raw, progress=False)


def test_channels_last_vae_training_makes_the_nchw_update_and_saves_standard_files(tmp_path):
    """train.channels_last (the default) is a layout, not a different model: over three steps (the discriminator's
    from the second) the losses are the NCHW run's to float rounding, and the files hold plain contiguous tensors
    that load as any. (Weights are not compared: Adam turns the rounding noise of a gradient that is zero in exact
    arithmetic, an attention key's bias, into full-size steps.)"""
    runs = {}
    for layout in (True, False):
        config, raw = load_run_config(VAERunConfig, write_config(
            tmp_path / f"vae-{layout}.yaml", TINY_VAE_RUN, max_steps=3, checkpoint_every=3, sample_every=0,
            channels_last=layout))
        runs[layout] = train_vae(config, tmp_path / f"run-{layout}", raw=raw, progress=False)
    for key in ("rec_loss", "kl", "d_loss"):
        ours, plain = ([r[key] for r in metrics(runs[layout]) if key in r] for layout in (True, False))
        assert len(ours) == len(plain) > 0 and ours == pytest.approx(plain, rel=1e-4), key
    saved = weights(runs[True] / "checkpoints" / "step-00000003", "vae")
    assert all(value.is_contiguous() for value in saved.values())
    assert_identical(saved, load_vae(runs[True]).state_dict())
    with pytest.raises(ConfigError, match="channels_last"):
        load_run_config(VAERunConfig, write_config(tmp_path / "bad.yaml", TINY_VAE_RUN, channels_last="yes"))


def test_discriminator_deeper_than_the_images_allow_is_named(tmp_path):
    config, raw = load_run_config(VAERunConfig, write_config(tmp_path / "vae.yaml", TINY_VAE_RUN, disc_layers=3))
    with pytest.raises(ConfigError, match="train.disc_layers 3 needs images of at least 24px, data.resolution is 16"):
        train_vae(config, tmp_path / "run", raw=raw, progress=False)
    assert not (tmp_path / "run").exists()
    for layers, side in ((1, 6), (2, 12), (3, 24)):  # min_side is the exact edge: one logit there, an error below
        disc = PatchDiscriminator(3, 8, layers)
        assert disc(torch.zeros(1, 3, side, side)).shape[-2:] == (1, 1)
        with pytest.raises(RuntimeError):
            disc(torch.zeros(1, 3, side - 2, side - 2))


def test_resume_in_another_layout_says_it_is_no_longer_bit_exact(tmp_path, capsys):
    first, raw = load_run_config(VAERunConfig, write_config(
        tmp_path / "a.yaml", TINY_VAE_RUN, max_steps=1, checkpoint_every=1, sample_every=0, channels_last=False))
    train_vae(first, tmp_path / "run", raw=raw, progress=False)
    capsys.readouterr()
    for layout, noted in ((False, False), (True, True)):
        more, raw = load_run_config(VAERunConfig, write_config(
            tmp_path / "b.yaml", TINY_VAE_RUN, max_steps=2 + noted, checkpoint_every=1, sample_every=0,
            channels_last=layout))  # a step more each time: a resume with nothing left to train stops at once
        train_vae(more, tmp_path / "run", raw=raw, resume=True, progress=False)
        said = capsys.readouterr().err
        assert ("trained with train.channels_last false, this config says true" in said) is noted, said


def test_unet_from_scratch_takes_its_channels_from_the_vae(tmp_path):
    from latentdiffusion.training.train_ldm import build_pipeline

    folder = tmp_path / "vae8"
    wide = VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8, sample_size=16, latent_channels=8)
    save_components(folder, Components(configs={"vae": wide}, weights={"vae": AutoencoderKL(wide).state_dict()}))
    config, raw = ldm_config(tmp_path)
    pipe = build_pipeline(config, raw, vae=folder, init=None, text_encoder=None)
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels, pipe.unet.config.sample_size) == (8, 8, 8)
    assert pipe(["a red circle"], num_inference_steps=1, output_type="latent").shape == (1, 8, 8, 8)


def train_curve(tmp_path: Path) -> list[dict]:
    """A 40-step VAE run without the discriminator: reconstruction only."""
    config, raw = load_run_config(VAERunConfig, write_config(
        tmp_path / "curve.yaml", TINY_VAE_RUN, max_steps=40, batch_size=8, learning_rate=3e-3, disc_start=1000,
        log_every=10, checkpoint_every=40, sample_every=0))
    return metrics(train_vae(config, tmp_path / "curve", raw=raw, progress=False))


# ------------------------------------------------------------------------------------------------- nothing lost
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "latentdiffusion", *args]


def resume_after_sigkill(tmp_path: Path, command: str, common: list[str], files: list[str]) -> str:
    """Run `ldm COMMAND *common` (6 steps, checkpoints every 2, the newest 2 kept) to its end, and again killed outright
    (SIGKILL) as soon as its step-2 checkpoint is whole, with a half-written checkpoint left beside it, then resumed
    (in tmp_path / "killed"): the weights `files` (safetensors names) of both step-6 checkpoints are bit-identical.
    Returns what the resumed run wrote to stderr."""
    reference = subprocess.Popen(_cli(command, *common, "--output", str(tmp_path / "reference")), env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # A run that goes on far longer, killed outright as soon as its step-2 checkpoint is whole.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(command, *common, "--output", str(killed), "--max-steps", "1000"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (killed / "checkpoints" / "step-00000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # As if it had died mid-save as well: a half-written checkpoint beside the whole ones.
    partial = killed / "checkpoints" / ".tmp-step-00000006-99999"
    partial.mkdir()
    (partial / f"{files[0]}.safetensors").write_bytes(b"truncated")
    assert all(p.name.startswith("step-") for _, p in list_checkpoints(killed))

    resumed = subprocess.run(_cli(command, *common, "--output", str(killed), "--resume"), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and ".tmp-step-00000006-99999" in resumed.stderr
    assert "taking over the lock of a run that is no longer running" in resumed.stderr  # the killed run's run.lock
    assert reference.wait() == 0
    done_ref, done_resumed = (tmp_path / "reference/checkpoints/step-00000006", killed / "checkpoints/step-00000006")
    for name in files:
        assert_identical(weights(done_ref, name), weights(done_resumed, name))
    assert not partial.exists()
    assert [p.name for _, p in list_checkpoints(killed)] == ["step-00000004", "step-00000006"]  # keep_checkpoints=2
    return resumed.stderr


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, vae_dir):
    cfg = write_config(tmp_path / "ldm.yaml", TINY_LDM)
    common = ["--config", str(cfg), "--vae", str(vae_dir), "--data", "builtin:shapes"]
    resume_after_sigkill(tmp_path, "train", common, ["unet", "text_encoder", "ema/unet", "ema/text_encoder"])


@pytest.mark.slow
def test_two_gloo_processes_make_the_same_update_as_one(tmp_path, vae_dir):
    """2 processes x batch 2 and 1 process x batch 2 x 2 accumulation steps see the same global batch of 4, each
    image with the same noise, timestep and caption dropout: the updates agree to float32 rounding."""
    cfg = write_config(tmp_path / "ldm.yaml", TINY_LDM, max_steps=2, checkpoint_every=2)
    common = ["--config", str(cfg), "--vae", str(vae_dir), "--data", "builtin:shapes"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "latentdiffusion", "train", *common, "--output", str(tmp_path / "ddp")],
                         env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 4 = 2 per process x 2 process(es) x 1 accumulation" in two.stderr
    one = subprocess.run(_cli("train", *common, "--output", str(tmp_path / "one"),
                              "--set", "train.gradient_accumulation=2"), env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "global batch 4 = 2 per process x 1 process(es) x 2 accumulation" in one.stderr
    a, b = tmp_path / "ddp/checkpoints/step-00000002", tmp_path / "one/checkpoints/step-00000002"
    for name in ("unet", "text_encoder", "ema/unet"):
        wa, wb = weights(a, name), weights(b, name)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
    moments_a, moments_b = load_state(a)["optimizer"]["state"], load_state(b)["optimizer"]["state"]
    for index in moments_a:  # Adam's first moment is the averaged gradient history: same global mean
        torch.testing.assert_close(moments_a[index]["exp_avg"], moments_b[index]["exp_avg"], rtol=1e-3, atol=1e-8)


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path):
    run = tmp_path / "run"

    def fails_halfway(folder: Path) -> None:
        (folder / "unet.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_checkpoint(run, 3, fails_halfway, keep=2)
    assert list_checkpoints(run) == []  # the partial folder is never mistaken for a checkpoint
    assert clean_leftovers(run) and not any((run / "checkpoints").iterdir())
    for step in (1, 2, 3):
        write_checkpoint(run, step, lambda folder: (folder / STATE_FILE).write_bytes(b"x"), keep=2)
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]


def test_resume_without_checkpoint_starts_over_and_fresh_run_refuses_a_used_folder(tmp_path, vae_dir, capsys):
    config, raw = ldm_config(tmp_path, max_steps=1, checkpoint_every=1)
    run = train_ldm(config, tmp_path / "run", vae=vae_dir, raw=raw, resume=True, progress=False)
    assert "holds no whole checkpoint yet; starting from the beginning" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(run)] == [1]
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        train_ldm(config, run, vae=vae_dir, raw=raw, progress=False)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_never_reaches_a_checkpoint(tmp_path, vae_dir, monkeypatch, policy):
    original, calls = Pipeline.diffusion_loss, []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(Pipeline, "diffusion_loss", poisoned)
    config, raw = ldm_config(tmp_path, max_steps=3, checkpoint_every=1, keep_checkpoints=0, on_nonfinite=policy)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="non-finite loss=nan.* at step 2"):
            train_ldm(config, tmp_path / "run", vae=vae_dir, raw=raw, progress=False)
        assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1]
        return
    run = train_ldm(config, tmp_path / "run", vae=vae_dir, raw=raw, progress=False)
    checkpoints = [p for _, p in list_checkpoints(run)]
    assert len(checkpoints) == 3 and metrics(run)[-1]["skipped"] == 1
    assert_identical(weights(checkpoints[0], "unet"), weights(checkpoints[1], "unet"))  # step 2 changed nothing
    assert all(torch.isfinite(t).all() for t in weights(checkpoints[2], "unet").values())


def test_batch_order_shards_global_batches_and_resumes_mid_epoch():
    single = BatchOrder(20, 4, world_size=1, rank=0, accumulation=2, seed=3)
    ranks = [BatchOrder(20, 4, world_size=2, rank=r, seed=3) for r in range(2)]
    for step in range(5):  # crosses into the second epoch (2 steps of 8 per epoch)
        assert single.indices(step, 0) + single.indices(step, 1) == ranks[0].indices(step, 0) + ranks[1].indices(step, 0)
    epoch = [i for step in range(2) for m in range(2) for i in single.indices(step, m)]
    assert len(set(epoch)) == 16  # no image twice within an epoch
    resumed = iter(BatchOrder(20, 4, accumulation=2, seed=3, start_step=3))
    assert next(resumed) == [(1, i) for i in single.indices(3, 0)]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchOrder(7, 4, world_size=2)


@pytest.mark.slow
def test_fine_tuning_from_init_takes_its_weights_and_only_the_flags_the_config_sets(tmp_path, vae_dir):
    config, raw = ldm_config(tmp_path, max_steps=1, checkpoint_every=1)
    base = train_ldm(config, tmp_path / "base", vae=vae_dir, raw=raw, progress=False)
    start = LatentDiffusion.from_pretrained(base)  # EMA weights: what --init starts from
    tuned_yaml = {"model": {"text_encoder": {"trainable": False}, "scheduler": {"prediction_type": "v_prediction"}},
                  "train": {**TINY_LDM["train"], "max_steps": 1, "checkpoint_every": 1, "ema_decay": 0.0},
                  "data": TINY_LDM["data"]}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tuned_yaml))
    tune, tune_raw = load_run_config(LDMRunConfig, tmp_path / "tune.yaml")
    run = train_ldm(tune, tmp_path / "tuned", init=base, raw=tune_raw, progress=False)
    tuned = LatentDiffusion.from_pretrained(run)
    assert tuned.scheduler.config.prediction_type == "v_prediction"
    assert tuned.text_encoder.config.hidden_size == 32 and not tuned.text_encoder.config.trainable
    assert_identical(tuned.text_encoder.model.state_dict(), start.text_encoder.model.state_dict())  # frozen
    assert_identical(tuned.vae.state_dict(), start.vae.state_dict())
    steps = [(v - start.unet.state_dict()[k]).abs().max().item() for k, v in tuned.unet.state_dict().items()]
    assert 0 < max(steps) <= 2e-3  # one Adam step (lr 1e-3) away from --init's UNet
    bad = {**tuned_yaml, "model": {"unet": {"dropout": 0.1}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    bad_config, bad_raw = load_run_config(LDMRunConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"model.unet.dropout' \(0.1\) conflicts with --init's \(0.0\)"):
        train_ldm(bad_config, tmp_path / "bad", init=base, raw=bad_raw, progress=False)


@pytest.mark.slow
def test_fine_tuning_an_sd_single_file_exports_back(tmp_path):
    """`ldm train --init model.safetensors` trains the file's UNet only; the result goes back to a single file."""
    from latentdiffusion import LatentDiffusionConfig, TextEncoderConfig, UNetConfig

    torch.manual_seed(0)
    sd_like = Pipeline.from_config(LatentDiffusionConfig(  # SD 1.x layout at toy size: 8 heads, 32 groups
        vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, sample_size=16),
        unet=UNetConfig(block_channels=(32, 64), cross_attention=(True, False), context_dim=64, layers_per_block=1,
                        sample_size=8),
        text_encoder=TextEncoderConfig(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=64)))
    sd_like.save_pretrained(tmp_path / "sd.safetensors", format="single-file")
    start = LatentDiffusion.from_pretrained(tmp_path / "sd.safetensors")
    tune = {"model": {}, "train": {**TINY_LDM["train"], "max_steps": 1, "checkpoint_every": 1, "ema_decay": 0.0},
            "data": TINY_LDM["data"]}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tune))
    config, raw = load_run_config(LDMRunConfig, tmp_path / "tune.yaml")
    run = train_ldm(config, tmp_path / "tuned", init=tmp_path / "sd.safetensors", raw=raw, progress=False)
    LatentDiffusion.from_pretrained(run).save_pretrained(tmp_path / "tuned.safetensors", format="single-file")
    tuned = LatentDiffusion.from_pretrained(tmp_path / "tuned.safetensors")
    assert_identical(tuned.vae.state_dict(), start.vae.state_dict())
    assert_identical(tuned.text_encoder.model.state_dict(), start.text_encoder.model.state_dict())
    steps = [(v - start.unet.state_dict()[k]).abs().max().item() for k, v in tuned.unet.state_dict().items()]
    assert 0 < max(steps) <= 2e-3  # one Adam step (lr 1e-3) away from the file's UNet


def test_inpainting_unet_trains_with_random_masks(tmp_path, vae_dir):
    """A config whose UNet takes 9 channels trains an inpainting model: random masks, masked images' latents."""
    unet = {**TINY_LDM["model"]["unet"], "in_channels": 9}
    base = {**TINY_LDM, "model": {**TINY_LDM["model"], "unet": unet}}
    config, raw = load_run_config(LDMRunConfig, write_config(
        tmp_path / "inpaint.yaml", base, max_steps=4, checkpoint_every=4, sample_every=4, sample_steps=1,
        validation_prompts=["a red circle"]))
    run = train_ldm(config, tmp_path / "run", vae=vae_dir, raw=raw, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(run))
    assert (run / "samples" / "step-00000004.png").is_file()  # sampled with a whole-image mask
    pipe = LatentDiffusion.from_pretrained(run)
    assert pipe.unet.config.in_channels == 9
    image, mask = torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    out = pipe("a red circle", image=image, mask_image=mask, num_inference_steps=2, output_type="pt")
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    cached, raw = load_run_config(LDMRunConfig, write_config(tmp_path / "cached.yaml", base, cache_latents=True))
    with pytest.raises(ConfigError, match="cache_latents"):
        train_ldm(cached, tmp_path / "cached", vae=vae_dir, raw=raw, progress=False)
