"""`LlamaConfig`: the model's shape with Hugging Face's field names, and conversion from/to `config.json`.

Reads both layouts found in the wild: transformers 5.x writes `rope_parameters` (holding `rope_theta`,
`rope_type` and the llama3 fields), checkpoints written by 4.x carry top-level `rope_theta` and `rope_scaling`.
Writes both, so that 4.x and 5.x readers (vLLM, TGI, transformers) see the same RoPE.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """The `llama3` RoPE frequency scaling (LLaMA 3.1+): long wavelengths slowed by `factor`, smoothed in between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (HF field names) plus run-time options that are not part of a HF checkpoint.

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
    head_dim: int | None = None  # None: = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # Run-time options (never written to config.json).
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "none"  # none | full | dots | dots_no_batch (what each layer keeps for backward)
    scan_layers: bool = False  # one scanned layer body instead of L unrolled copies (faster compiles)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _parse_rope_scaling(dict(self.rope_scaling), "rope_scaling"))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"LlamaConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters (embeddings and head included)."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                           self.num_key_value_heads, self.head_dim)
        per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_hidden_layers * per_layer + d + head

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], source: str = "config.model") -> "LlamaConfig":
        """From a plain dict / ConfigDict of our field names (the `model` section of a configs/ file)."""
        fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)  # ConfigDict → plain dicts
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    # ---- Hugging Face config.json ----------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json", **runtime) -> "LlamaConfig":
        """Builds a config from a HF `config.json` dict (4.x or 5.x layout); `runtime` sets dtype, remat, ..."""
        hf = dict(hf)
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type is {model_type!r}; only 'llama' checkpoints are supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act is {hf['hidden_act']!r}; LLaMA uses 'silu'")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported (LLaMA has no biases)")

        rope_theta = hf.get("rope_theta", 10000.0)
        rope_scaling = hf.get("rope_scaling")
        rope_params = hf.get("rope_parameters")
        if rope_params:  # transformers >= 5 layout; it wins over the legacy keys
            rope_theta = rope_params.get("rope_theta", rope_theta)
            rope_scaling = rope_params
        scaling = _parse_rope_scaling(rope_scaling, source)

        fields = {f.name for f in dataclasses.fields(cls)}
        arch = {}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                    "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in hf and (hf[key] is not None or key.endswith("_token_id")):
                arch[key] = hf[key]
        unknown = set(runtime) - fields
        if unknown:
            raise ValueError(f"unknown LlamaConfig options: {sorted(unknown)}")
        try:
            return cls(**arch, rope_theta=float(rope_theta), rope_scaling=scaling, **runtime)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` dict that transformers' `LlamaForCausalLM` loads (5.x and 4.x keys)."""
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope_parameters.update(self.rope_scaling.to_hf())
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "rope_parameters": rope_parameters,
            "rope_theta": self.rope_theta,  # 4.x readers
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_hf(),  # 4.x readers
            "dtype": self.param_dtype,
            "torch_dtype": self.param_dtype,  # 4.x readers
        }


def _parse_rope_scaling(spec: Mapping[str, Any] | None, source: str) -> Llama3RopeScaling | None:
    if not spec:
        return None
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (only 'default' and 'llama3')")
    try:
        return Llama3RopeScaling(factor=float(spec["factor"]), low_freq_factor=float(spec["low_freq_factor"]),
                                 high_freq_factor=float(spec["high_freq_factor"]),
                                 original_max_position_embeddings=int(spec["original_max_position_embeddings"]))
    except KeyError as e:
        raise ValueError(f"{source}: llama3 rope scaling lacks field {e.args[0]!r}") from e
