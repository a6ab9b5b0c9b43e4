"""What a user meets at the edges: pipeline arguments checked by name, one-line errors only for bad input (bugs keep
their traceback), and messages that PYTHONWARNINGS=ignore cannot hide."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import smallest_model

from latentdiffusion import LatentDiffusion
from latentdiffusion.cli import main
from latentdiffusion.config import from_dict
from latentdiffusion.errors import ArgumentError, ConfigError, UserInputError
from latentdiffusion.text_encoder import TextEncoderConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return LatentDiffusion.from_config(smallest_model())


# ------------------------------------------------------------------------------------------ pipeline arguments
@pytest.mark.parametrize("prompt, kwargs, message", [
    (None, {}, "prompt must be a string or a non-empty list of strings, got None"),
    ([], {}, "prompt must be a string or a non-empty list"),
    (["a cat", None], {}, r"prompt\[1\] must be a string, got None"),
    ("a cat", dict(negative_prompt=[None]), r"negative_prompt\[0\] must be a string"),
    ("a cat", dict(height=8.0), r"height must be an integer, got 8.0 \(float\)"),
    ("a cat", dict(width=True), "width must be an integer"),
    ("a cat", dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1, got 0"),
    ("a cat", dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
    ("a cat", dict(guidance_scale="7"), "guidance_scale must be a finite number"),
    ("a cat", dict(eta=-0.5), r"eta must be >= 0.0, got -0.5"),
    ("a cat", dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
    ("a cat", dict(noise_level=20), "noise_level applies to upscaler models only"),  # not silently ignored
])
def test_bad_arguments_are_argument_errors_naming_them(pipe, prompt, kwargs, message):
    with pytest.raises(ArgumentError, match=message) as info:
        pipe(prompt, **{"num_inference_steps": 2, "output_type": "latent", **kwargs})
    assert isinstance(info.value, ValueError)  # `except ValueError` callers keep working


def test_numpy_integers_are_integers(pipe):
    def run(**kwargs):
        return pipe(["a cat"], generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)

    ints = run(num_inference_steps=2, num_images_per_prompt=2, height=16, width=16)
    numpy = run(num_inference_steps=np.int64(2), num_images_per_prompt=np.int32(2), height=np.int64(16),
                width=np.uint8(16))
    assert ints.shape == (2, 4, 8, 8) and torch.equal(ints, numpy)


# ------------------------------------------------------------------------------------------ errors that hide bugs
def test_error_classes_are_value_errors_under_one_base():
    for cls in (ArgumentError, ConfigError):
        assert issubclass(cls, UserInputError) and issubclass(cls, ValueError)


def test_config_type_error_in_post_init_is_not_a_config_error():
    """A TypeError raised while building a config is a bug in its checks: it keeps its type (and traceback)."""
    from dataclasses import dataclass

    @dataclass
    class Buggy:
        size: int = 1

        def __post_init__(self) -> None:
            if self.size < "1":  # the planted bug
                raise ConfigError("never")

    with pytest.raises(TypeError, match="not supported between"):
        from_dict(Buggy, {"size": 2}, "x")


def test_missing_required_config_key_is_named():
    from dataclasses import dataclass

    @dataclass
    class Needs:
        size: int

    with pytest.raises(ConfigError, match="config key 'x.size' is required"):
        from_dict(Needs, {}, "x")


def test_cli_input_error_is_one_line_and_debug_shows_its_traceback(capsys, tmp_path):
    args = ["convert", "/no/such/model", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm: error: model not found: /no/such/model") and "Traceback" not in err
    for debug in (["--debug", *args], [*args, "--debug"]):
        assert main(debug) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "ldm: error: model not found" in err


def test_cli_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """A ValueError from deep inside (here: a shape bug planted in the loader) is not turned into bad input."""
    import latentdiffusion.formats as formats

    def buggy(*args, **kwargs):
        return torch.zeros(2, 3) @ torch.zeros(2, 3)  # RuntimeError: shapes cannot be multiplied

    monkeypatch.setattr(formats, "load_components", buggy)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        main(["convert", str(tmp_path), str(tmp_path / "out")])

    def value_bug(*args, **kwargs):
        raise ValueError("an internal check failed")

    monkeypatch.setattr(formats, "load_components", value_bug)
    with pytest.raises(ValueError, match="an internal check failed"):
        main(["convert", str(tmp_path), str(tmp_path / "out")])


# ------------------------------------------------------------------------------------------ messages
@pytest.mark.slow
def test_skipped_file_is_named_whatever_pythonwarnings_says(tmp_path):
    """The reported case: `ldm train` on a folder with an unreadable image under PYTHONWARNINGS=ignore printed only
    "(1 skipped)". The run stops early at a config error after the data is read; the name must be printed."""
    for i in range(2):
        Image.new("RGB", (16, 16), (50 * i, 0, 0)).save(tmp_path / f"ok{i}.png")
        (tmp_path / f"ok{i}.txt").write_text("a red square")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "broken.txt").write_text("a broken square")
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "latentdiffusion", "train-vae", "--data", str(tmp_path), "--output",
         str(tmp_path / "run"), "--resolution", "8", "--batch-size", "4", "--set", "train.device=cpu"],
        env=env, capture_output=True, text=True, timeout=120)
    assert "ldm: warning: " in result.stderr and "broken.png" in result.stderr, result.stderr
    assert result.returncode == 2 and "fewer than one global batch" in result.stderr  # 2 images < batch 4


def test_no_warnings_warn_in_the_library():
    """User-facing messages go through messages.warn; a warnings.warn call would be lost under PYTHONWARNINGS."""
    calls = [str(p) for p in Path(SRC).rglob("*.py") if "warnings.warn(" in p.read_text()]
    assert not calls, calls


# ------------------------------------------------------------------------------------------ long prompts
def test_cut_prompt_is_reported_with_its_count_and_words(caplog):
    """The reported case: a 94-token prompt in a batch with a short one was cut to 77 places without a word."""
    from latentdiffusion.text_encoder import TextEncoder

    encoder = TextEncoder(TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16))
    words = ("a red circle and a blue square on a grey ground " * 9).split()[:92]  # one token each
    long = " ".join(words)
    ids = encoder.tokenize([long, "a cat"])
    reference = encoder.tokenizer([long, "a cat"], padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
    assert torch.equal(ids, reference)  # the ids are what they were; only the message is new
    assert ids[0, 1:76].tolist() == encoder.tokenizer(" ".join(words[:75]), add_special_tokens=False).input_ids
    dropped = " ".join(words[75:])
    assert f"prompt of 92 tokens cut to the text encoder's 75: dropped the last 17 ({dropped!r})" in caplog.text
    assert caplog.text.count("cut to") == 1  # the short prompt is not reported
    encoder.tokenize([long])
    assert caplog.text.count("cut to") == 1  # nor the same prompt twice
    caplog.clear()
    encoder.tokenize([" ".join(words[:75]), " ".join(words[:74])])  # exactly full, and one short: nothing cut
    assert not caplog.text
