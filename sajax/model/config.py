"""`ModelConfig`: the model's shape with Hugging Face's field names, the switches that make one decoder each
supported family, and conversion from/to `config.json`.

Families (HF `model_type`), as switches on one decoder (MaxText's way, not a copy of the model per family):
  llama    LLaMA 1/2/3: no biases (or `attention_bias` on q/k/v/o), optional llama3 RoPE scaling
  mistral  no biases; sliding-window attention on every layer when `sliding_window` is set
  qwen2    biases on q/k/v (none on o); sliding window on the layers `layer_types` names
  qwen3    RMSNorm over head_dim on each query and key head before RoPE (`qk_norm`), explicit head_dim
All four use the half-split ("rotate_half") RoPE layout of HF checkpoints and a SwiGLU MLP.

Reads both layouts found in the wild: transformers 5.x writes `rope_parameters` (holding `rope_theta`,
`rope_type` and the llama3 fields), checkpoints written by 4.x carry top-level `rope_theta` and `rope_scaling`.
Writes both, so that 4.x and 5.x readers (vLLM, TGI, transformers) see the same RoPE.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"  # HF's `layer_types` values
LORA_TARGETS = r"(q|k|v|o|gate|up|down)_proj$"  # default LoRA targets: every attention and MLP projection


@dataclasses.dataclass(frozen=True)
class Family:
    """What a HF `model_type` fixes: its architecture class and its switches' defaults and allowed values."""

    architecture: str  # transformers class written to config.json
    qkv_bias: bool  # default of ModelConfig.qkv_bias
    qk_norm: bool  # qk_norm is exactly this
    o_bias_follows_qkv: bool  # HF's `attention_bias` sets q/k/v/o biases together (else o never has one)
    qkv_bias_fixed: bool  # the family's class has no switch for it (qwen2: always, mistral: never)
    sliding: str  # "none" | "all" (every layer or none) | "layers" (per layer, `layer_types`)


FAMILIES = {
    "llama": Family("LlamaForCausalLM", qkv_bias=False, qk_norm=False, o_bias_follows_qkv=True,
                    qkv_bias_fixed=False, sliding="none"),
    "mistral": Family("MistralForCausalLM", qkv_bias=False, qk_norm=False, o_bias_follows_qkv=True,
                      qkv_bias_fixed=True, sliding="all"),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, qk_norm=False, o_bias_follows_qkv=False,
                    qkv_bias_fixed=True, sliding="layers"),
    "qwen3": Family("Qwen3ForCausalLM", qkv_bias=False, qk_norm=True, o_bias_follows_qkv=True,
                    qkv_bias_fixed=False, sliding="layers"),
}


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
class ModelConfig:
    """Architecture (HF field names) plus run-time options that are not part of a HF checkpoint.

    Frozen and hashable, so it can be a static argument of `jax.jit`. The family switches (`qkv_bias`, `o_bias`,
    `qk_norm`) default to what `model_type` implies; a combination the family's HF class cannot express is refused
    (it could not be exported).
    """

    model_type: str = "llama"  # llama | mistral | qwen2 | qwen3 (FAMILIES)
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
    qkv_bias: bool | None = None  # biases on the q/k/v projections (None: the family's default)
    o_bias: bool | None = None  # a bias on the output projection (None: as HF's attention_bias implies)
    qk_norm: bool | None = None  # RMSNorm on each query/key head before RoPE (qwen3; None: the family's)
    sliding_window: int | None = None  # a query sees keys fewer than this many positions back (sliding layers)
    layer_types: tuple[str, ...] | None = None  # per layer full_attention | sliding_attention (None: every layer
    # sliding when sliding_window is set, else full)
    # Run-time options (never written to config.json).
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "none"  # none | full | dots | dots_no_batch (what each layer keeps for backward)
    scan_layers: bool = False  # one scanned layer body instead of L unrolled copies (faster compiles)
    lora_rank: int = 0  # > 0: LoRA adapters of this rank beside the targeted weights (sajax.model.lora)
    lora_alpha: float = 16.0  # LoRA scaling α (the update is α/r · A·B)
    lora_targets: str = LORA_TARGETS  # regex searched in each projection's path (layers_3/self_attn/q_proj; lm_head)
    lora_dropout: float = 0.0  # dropout on the adapters' input while training
    lora_modules_to_save: str = ""  # regex of parameter paths trained in full beside the adapters (PEFT's
    # modules_to_save; e.g. "lm_head$"); "" = none

    def __post_init__(self):
        family = FAMILIES.get(self.model_type)
        if family is None:
            raise ValueError(f"ModelConfig.model_type must be one of {sorted(FAMILIES)}, got {self.model_type!r}")
        self._resolve_family(family)
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
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        self._check_lora()
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")

    def _resolve_family(self, family: Family) -> None:
        """Fills the switches left None with the family's defaults, then refuses what its HF class cannot hold."""
        set_ = functools.partial(object.__setattr__, self)
        if self.qkv_bias is None:
            set_("qkv_bias", family.qkv_bias)
        if self.o_bias is None:
            set_("o_bias", self.qkv_bias if family.o_bias_follows_qkv else False)
        if self.qk_norm is None:
            set_("qk_norm", family.qk_norm)
        if isinstance(self.layer_types, list):
            set_("layer_types", tuple(self.layer_types))
        name = f"ModelConfig (model_type {self.model_type!r})"
        if self.qk_norm != family.qk_norm:
            raise ValueError(f"{name}: qk_norm must be {family.qk_norm}")
        if family.qkv_bias_fixed and self.qkv_bias != family.qkv_bias:
            raise ValueError(f"{name}: qkv_bias must be {family.qkv_bias}")
        expected_o = self.qkv_bias if family.o_bias_follows_qkv else False
        if self.o_bias != expected_o:
            raise ValueError(f"{name}: o_bias must be {expected_o} (with qkv_bias={self.qkv_bias})")
        if self.sliding_window is None:
            if self.layer_types is not None and SLIDING_ATTENTION in self.layer_types:
                raise ValueError(f"{name}: layer_types names sliding_attention layers but sliding_window is None")
            set_("layer_types", None)
            return
        if not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) or self.sliding_window < 1:
            raise ValueError(f"{name}: sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if family.sliding == "none":
            raise ValueError(f"{name}: this family has no sliding-window attention (sliding_window must be None)")
        types = self.layer_types or (SLIDING_ATTENTION,) * self.num_hidden_layers
        if len(types) != self.num_hidden_layers or not set(types) <= {FULL_ATTENTION, SLIDING_ATTENTION}:
            raise ValueError(f"{name}: layer_types must list {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r} for each of "
                             f"the {self.num_hidden_layers} layers, got {self.layer_types!r}")
        if family.sliding == "all" and FULL_ATTENTION in types:
            raise ValueError(f"{name}: every layer uses the sliding window in this family (layer_types)")
        if SLIDING_ATTENTION not in types:  # no sliding layer: the window changes nothing
            set_("sliding_window", None)
            set_("layer_types", None)
            return
        set_("layer_types", tuple(types))

    def _check_lora(self) -> None:
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise ValueError(f"lora.rank must be an integer >= 0 (0: off), got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("targets", "modules_to_save"):
            pattern = getattr(self, f"lora_{name}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"lora.{name} {pattern!r} is not a regular expression ({e})") from e

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        return self.layer_types is not None and self.layer_types[layer] == SLIDING_ATTENTION

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters (embeddings and head included; LoRA adapters too)."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                           self.num_key_value_heads, self.head_dim)
        per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * f + 2 * d
        per_layer += hd * (h + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        adapters = sum(self._adapter_params(i) for i in range(self.num_hidden_layers)) if self.lora_rank else 0
        if self.lora_rank and not self.tie_word_embeddings and re.search(self.lora_targets, "lm_head"):
            adapters += self.lora_rank * (d + self.vocab_size)
        return self.vocab_size * d + self.num_hidden_layers * per_layer + adapters + d + head

    def _adapter_params(self, layer: int) -> int:
        """LoRA parameters of a layer: r·(in + out) for each targeted projection (A [in, r], B [r, out]), whose
        path the regex sees as `layers_<i>/…` (scanned layers: `layers/…`, the same for all)."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                           self.num_key_value_heads, self.head_dim)
        sizes = {"self_attn/q_proj": (d, h * hd), "self_attn/k_proj": (d, kv * hd), "self_attn/v_proj": (d, kv * hd),
                 "self_attn/o_proj": (h * hd, d), "mlp/gate_proj": (d, f), "mlp/up_proj": (d, f),
                 "mlp/down_proj": (f, d)}
        prefix = "layers" if self.scan_layers else f"layers_{layer}"
        return sum(self.lora_rank * (i + o) for name, (i, o) in sizes.items()
                   if re.search(self.lora_targets, f"{prefix}/{name}"))

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], source: str = "config.model") -> "ModelConfig":
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
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json", **runtime) -> "ModelConfig":
        """Builds a config from a HF `config.json` dict (4.x or 5.x layout) of any family in FAMILIES; `runtime`
        sets dtype, remat, ..."""
        hf = dict(hf)
        model_type = hf.get("model_type", "llama")
        family = FAMILIES.get(model_type)
        if family is None:
            raise ValueError(f"{source}: model_type is {model_type!r}; supported: {sorted(FAMILIES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act is {hf['hidden_act']!r}; these families use 'silu'")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")

        rope_theta = hf.get("rope_theta", 10000.0)
        rope_scaling = hf.get("rope_scaling")
        rope_params = hf.get("rope_parameters")
        if rope_params:  # transformers >= 5 layout; it wins over the legacy keys
            rope_theta = rope_params.get("rope_theta", rope_theta)
            rope_scaling = rope_params
        scaling = _parse_rope_scaling(rope_scaling, source)

        fields = {f.name for f in dataclasses.fields(cls)}
        arch = {"model_type": model_type, **_hf_switches(hf, family)}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                    "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in hf and (hf[key] is not None or key.endswith("_token_id")):
                arch[key] = hf[key]
        unknown = set(runtime) - fields
        if unknown:
            raise ValueError(f"unknown ModelConfig options: {sorted(unknown)}")
        try:
            return cls(**arch, rope_theta=float(rope_theta), rope_scaling=scaling, **runtime)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` dict that transformers' class for `model_type` loads (5.x and 4.x keys)."""
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope_parameters.update(self.rope_scaling.to_hf())
        out = {
            "architectures": [FAMILIES[self.model_type].architecture],
            "model_type": self.model_type,
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
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "rope_parameters": rope_parameters,
            "rope_theta": self.rope_theta,  # 4.x readers
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_hf(),  # 4.x readers
            "dtype": self.param_dtype,
            "torch_dtype": self.param_dtype,  # 4.x readers
        }
        family = FAMILIES[self.model_type]
        if family.o_bias_follows_qkv and not family.qkv_bias_fixed:  # llama, qwen3
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = False
        if family.sliding == "all":  # mistral
            out["sliding_window"] = self.sliding_window
        elif family.sliding == "layers":  # qwen2, qwen3
            types = list(self.layer_types or (FULL_ATTENTION,) * self.num_hidden_layers)
            full_prefix = next((i for i, t in enumerate(types) if t == SLIDING_ATTENTION), len(types))
            out.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                       max_window_layers=full_prefix, layer_types=types)
        return out


def _hf_switches(hf: Mapping[str, Any], family: Family) -> dict[str, Any]:
    """The family switches a HF config.json sets: biases (`attention_bias`), the sliding window and which layers
    use it (`use_sliding_window`, `max_window_layers`, `layer_types` in qwen2/qwen3; every layer in mistral)."""
    out = {}
    if not family.qkv_bias_fixed:
        out["qkv_bias"] = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window")
    if family.sliding == "all":
        out["sliding_window"] = window
    elif family.sliding == "layers":
        window = window if hf.get("use_sliding_window", False) else None
        layers = hf.get("num_hidden_layers")
        types = hf.get("layer_types")
        if types is None and window is not None and isinstance(layers, int):
            first = hf.get("max_window_layers", layers)
            types = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(layers)]
        out.update(sliding_window=window, layer_types=None if window is None else types)
    return out


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
