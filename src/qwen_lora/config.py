"""Qwen2 model configuration with Hugging Face's field names, and the published presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_lora.errors import ModelLoadError, read_json_object

SUPPORTED_MODEL_TYPES = ("qwen2",)


@dataclass
class ModelConfig:
    """The architecture of a Qwen2 model, as in Hugging Face's `config.json`."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    model_type: str = "qwen2"
    torch_dtype: str = "bfloat16"
    use_sliding_window: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: qwen_lora supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}: Qwen2 uses 'silu'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.eos_token_id
        if ids is None:
            return set()
        return set(ids) if isinstance(ids, list) else {ids}

    def kv_cache_bytes(self, tokens: int, bytes_per_element: int, batch: int = 1) -> int:
        """layers x 2 (key, value) x batch x KV heads x tokens x head_dim x bytes."""
        return (self.num_hidden_layers * 2 * batch * self.num_key_value_heads * tokens
                * self.head_dim * bytes_per_element)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a `config.json` dict: classic `rope_theta` or newer `rope_parameters`."""
        data = dict(data)
        rope = data.pop("rope_parameters", None) or {}
        if "rope_theta" not in data and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        scaling = data.pop("rope_scaling", None)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or rope.get(
            "rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE scaling {rope_type!r}: only 'default' is supported")
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        if data.get("model_type") is None:
            raise ValueError("config has no 'model_type'")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if known.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported")
        return cls(**known, extra=extra)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a model directory; errors name the file (and line)."""
        file = Path(path) / "config.json"
        data = read_json_object(file, ModelLoadError, "no config.json in the model directory")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"{file}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` that Hugging Face `transformers` reads."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        out["architectures"] = ["Qwen2ForCausalLM"]
        out["head_dim"] = self.head_dim
        out.setdefault("attention_dropout", 0.0)
        out.setdefault("sliding_window", None)
        out.setdefault("max_window_layers", self.num_hidden_layers)
        out.setdefault("use_cache", True)
        return out


_QWEN25_SMALL = dict(vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(_QWEN25_SMALL, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14,
                         max_position_embeddings=32768),
    "qwen2.5-coder-0.5b": dict(_QWEN25_SMALL, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14,
                               max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(_QWEN25_SMALL, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12,
                         max_position_embeddings=131072),
    "qwen2.5-3b": dict(_QWEN25_SMALL, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16,
                       max_position_embeddings=32768),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False, max_position_embeddings=131072),
    # Same code paths, small enough for unit tests and quick benchmark sweeps.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=4096, bos_token_id=None, eos_token_id=None),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A published architecture by name (see `PRESETS`), optionally with fields overridden."""
    try:
        fields = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    return ModelConfig(**{**fields, **overrides})
