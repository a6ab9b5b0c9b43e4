"""The CLIP text conditioner: prompts -> token ids -> context (B, max_length, hidden) for the UNet's cross-attention."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.activations import ACT2FN

from .arguments import texts
from .config import from_dict
from .errors import ArgumentError, ConfigError, WeightsError
from .messages import warn

TOKENIZER_DIR = Path(__file__).with_name("tokenizer")  # the real 49,408-token CLIP BPE tokenizer
LAYERS = ("last", "penultimate")
_OVERRIDABLE = ("layer", "trainable", "pad_token")  # the fields a CLIPTextConfig does not fix
MAX_CUT_REPORTS = 20  # distinct cut prompts reported per encoder (training captions repeat every epoch)
OPENAI_PAD = "<|endoftext|>"  # OpenAI CLIP (SD 1.x) pads prompts with its end token ...
OPENCLIP_PAD = "!"  # ... OpenCLIP (SD 2.x) with token 0, "!"


@dataclass
class TextEncoderConfig:
    """CLIP text transformer; the defaults are Stable Diffusion 1.x's (OpenAI CLIP ViT-L/14 text tower)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_length: int = 77
    hidden_act: str = "quick_gelu"
    layer: str = "last"  # "last" or "penultimate" (clip skip: hidden_states[-2] + final layer norm)
    trainable: bool = False
    pad_token: str = OPENAI_PAD  # what fills a prompt after its end token (SD 2.x: OPENCLIP_PAD)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"text_encoder config key '{key}' must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"text_encoder config key 'num_heads' ({self.num_heads}) must divide 'hidden_size' ({self.hidden_size})"
            )
        if self.hidden_act not in ACT2FN:
            raise ConfigError(
                f"text_encoder config key 'hidden_act' is {self.hidden_act!r}; choices: {', '.join(sorted(ACT2FN))}"
            )
        if self.layer not in LAYERS:
            raise ConfigError(f"text_encoder config key 'layer' is {self.layer!r}; choices: {', '.join(LAYERS)}")
        if not isinstance(self.trainable, bool):
            raise ConfigError(f"text_encoder config key 'trainable' must be a bool, got {self.trainable!r}")
        if not isinstance(self.pad_token, str) or not self.pad_token:
            raise ConfigError(f"text_encoder config key 'pad_token' must be a token string, got {self.pad_token!r}")

    def to_clip_config(self) -> CLIPTextConfig:
        """The transformers CLIPTextConfig of this architecture, with SDPA attention."""
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            projection_dim=self.hidden_size,  # unused by CLIPTextModel; SD's config.json files have it so
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_length,
            hidden_act=self.hidden_act,
            attn_implementation="sdpa",
        )

    @classmethod
    def from_clip_config(cls, cfg: CLIPTextConfig, **overrides: object) -> TextEncoderConfig:
        """Our config for a CLIPTextConfig (a diffusers text_encoder/config.json); `overrides`: layer, trainable,
        pad_token."""
        bad = sorted(set(overrides) - set(_OVERRIDABLE))
        if bad:
            raise ConfigError(f"from_clip_config: '{bad[0]}' is fixed by the CLIP config (only "
                              f"{', '.join(_OVERRIDABLE)} are not)")
        if cfg.layer_norm_eps != 1e-5:
            raise ConfigError(f"CLIP config key 'layer_norm_eps' is {cfg.layer_norm_eps}; only 1e-5 is supported")
        fields = {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_hidden_layers,
            "num_heads": cfg.num_attention_heads,
            "intermediate_size": cfg.intermediate_size,
            "max_length": cfg.max_position_embeddings,
            "hidden_act": cfg.hidden_act,
        }
        return from_dict(cls, {**fields, **overrides}, "text_encoder")


class TextEncoder(nn.Module):
    """Prompts -> CLIP token ids -> CLIP text transformer hidden states, the UNet's cross-attention context."""

    def __init__(
        self, config: TextEncoderConfig, tokenizer_dir: str | Path | None = None, model: CLIPTextModel | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None  # None: the packaged one
        self.tokenizer = _load_tokenizer(self.tokenizer_dir or TOKENIZER_DIR, config.pad_token)
        if len(self.tokenizer) > config.vocab_size:
            raise ConfigError(
                f"text_encoder config key 'vocab_size' ({config.vocab_size}) is smaller than the tokenizer's "
                f"vocabulary ({len(self.tokenizer)} tokens)"
            )
        if model is None:
            model = CLIPTextModel(config.to_clip_config())
        else:
            _check_matches(model.config, config)
            model.set_attn_implementation("sdpa")
        self.model = model
        self._reported_cuts: set[str] = set()
        model.requires_grad_(config.trainable)
        if config.layer == "penultimate":  # the last block never reaches the output: no grads, no DDP unused params
            model.encoder.layers[-1].requires_grad_(False)
        self.train()

    def load_clip_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Load CLIPTextModel weights, keys with or without 'text_model.'; WeightsError naming `source` on a misfit."""
        weights = {}
        for key, value in state_dict.items():
            key = key.removeprefix("text_model.")
            if key != "embeddings.position_ids":  # a constant buffer that older transformers versions saved
                weights[key] = value
        expected = self.model.state_dict()
        missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
        if missing or unexpected:
            raise WeightsError(
                f"{source} does not fit the CLIP text model: "
                f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
            )
        for key, value in weights.items():
            if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise WeightsError(f"{source}: '{key}' is {shape}, the model expects {tuple(expected[key].shape)}")
        self.model.load_state_dict(weights)

    @property
    def device(self) -> torch.device:
        """The device the weights are on."""
        return self.model.embeddings.token_embedding.weight.device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, max_length) on the model's device: BOS, the prompt's tokens, EOS, pad tokens. A prompt
        longer than max_length - 2 tokens keeps its first ones (as CLIP and diffusers do); messages.warn says how
        many tokens and which words were cut (each distinct prompt once, MAX_CUT_REPORTS prompts at most)."""
        if isinstance(prompts, str):
            raise ArgumentError(f"prompts must be a list of strings, got the string {prompts!r}")
        prompts = texts(prompts, "prompts")
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.config.max_length, truncation=True, return_tensors="pt"
        ).input_ids  # (B, T)
        last = ids[:, -2]  # (B,) the last place before EOS: a prompt token where the prompt filled (or overfilled) it
        full = (last != self.tokenizer.pad_token_id) & (last != self.tokenizer.eos_token_id)
        if full.any():  # CPU tensors: no device sync
            self._report_cuts([p for p, f in zip(prompts, full.tolist()) if f])
        return ids.to(self.device)

    def _report_cuts(self, prompts: list[str]) -> None:
        """Say how many tokens, and which words, truncation cut from each of `prompts` that was too long."""
        limit = self.config.max_length - 2  # BOS and EOS take two places
        for prompt in (p for p in prompts if p not in self._reported_cuts):
            tokens = self.tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
            if len(tokens) <= limit or len(self._reported_cuts) >= MAX_CUT_REPORTS:
                continue
            self._reported_cuts.add(prompt)
            cut = self.tokenizer.decode(tokens[limit:])
            more = "; further cut prompts are not reported" if len(self._reported_cuts) == MAX_CUT_REPORTS else ""
            warn(f"prompt of {len(tokens)} tokens cut to the text encoder's {limit}: dropped the last "
                 f"{len(tokens) - limit} ({cut!r}) from {prompt[:60]!r}{'...' if len(prompt) > 60 else ''}{more}")

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Context (B, T, hidden) for ids (B, T): the last hidden state, or the penultimate one + the final norm."""
        ids = ids.to(self.device)
        if self.config.layer == "last":
            return self.model(ids).last_hidden_state  # (B, T, D)
        hidden = self.model(ids, output_hidden_states=True).hidden_states[-2]  # (B, T, D), before the last block
        return self.model.final_layer_norm(hidden)

    def forward(self, prompts: str | list[str]) -> torch.Tensor:
        """Context (B, max_length, hidden) for a prompt or a list of prompts."""
        return self.encode(self.tokenize([prompts] if isinstance(prompts, str) else prompts))

    def train(self, mode: bool = True) -> TextEncoder:
        """Train mode only when trainable: a frozen encoder stays in eval mode."""
        return super().train(mode and self.config.trainable)


def _check_matches(clip_config: CLIPTextConfig, config: TextEncoderConfig) -> None:
    """ConfigError naming the first field where a given model's architecture differs from `config`."""
    theirs = TextEncoderConfig.from_clip_config(clip_config)
    for field in dataclasses.fields(TextEncoderConfig):
        if field.name not in _OVERRIDABLE and getattr(theirs, field.name) != getattr(config, field.name):
            raise ConfigError(
                f"text_encoder config key '{field.name}' is {getattr(config, field.name)!r} "
                f"but the given model has {getattr(theirs, field.name)!r}"
            )


def _load_tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    """The CLIP tokenizer saved in `folder` (tokenizer.json, or vocab.json + merges.txt), offline, padding with
    `pad_token`."""
    if not folder.is_dir():
        raise WeightsError(f"tokenizer folder not found: {folder}")
    if not (folder / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise WeightsError(f"tokenizer file not found: {folder / name} (nor {folder / 'tokenizer.json'})")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, pad_token=pad_token)
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"cannot read the CLIP tokenizer in {folder}: {e}") from None
    if pad_token not in tokenizer.get_vocab():
        raise ConfigError(f"text_encoder config key 'pad_token' is {pad_token!r}, which is not one token of the "
                          f"tokenizer in {folder}")
    return tokenizer
