"""`ModelConfig`: the model's slice of the flat config, a frozen dataclass (hashable, so it can
be a static jit argument). layers.py and model.py both read it; it reads neither, so the data
flows one way: config -> model_config -> layers -> model.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from llm_jax import attention as attn_lib
from llm_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyper-parameters (see configs/base.py for each field's meaning)."""
  vocab_size: int
  d_model: int
  n_heads: int
  n_kv_heads: int
  n_layers: int
  d_ff: int
  d_k: int
  d_v: int
  vocab_multiple: int = 128
  max_position_embeddings: int = 2048
  position_embedding: str = "rope"
  rope_theta: float = 10000.0
  activation: str = "gelu"
  use_rms_norm: bool = False
  layer_norm_eps: float = 1e-5
  use_bias: bool = True
  tie_embeddings: bool = True
  qkv_bias: Optional[bool] = None  # None = use_bias
  rope_scaling: str = "none"
  rope_scaling_factor: Optional[float] = None
  rope_low_freq_factor: Optional[float] = None
  rope_high_freq_factor: Optional[float] = None
  rope_original_max_len: Optional[int] = None
  rope_beta_fast: Optional[float] = None
  rope_beta_slow: Optional[float] = None
  rope_attention_factor: Optional[float] = None
  rope_mscale: Optional[float] = None
  rope_mscale_all_dim: Optional[float] = None
  rope_truncate: Optional[bool] = None
  sliding_window: Optional[int] = None
  qk_norm: bool = False
  dropout: float = 0.0
  attention_dropout: float = 0.0
  hidden_dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "xla"
  context_parallel_impl: str = "all_gather"
  context_load_balance: bool = True
  remat_policy: str = "none"
  scan_layers: bool = False
  # How the weights are applied (see `build`): LoRA adapters (lora.py) and quantized kernels
  # (quantize.py; quant is "", "int8", "int4" or "nf4").
  lora_r: int = 0
  lora_alpha: float = 0.0
  lora_targets: str = "q,v"
  lora_dropout: float = 0.0
  lora_train_embeddings: bool = False
  lora_trainable_tokens: str = ""  # token ids, comma-separated (lora.resolve_tokens made them ids)
  quant: str = ""
  quant_group_size: int = 64
  quantize_embeddings: bool = False

  def __post_init__(self):
    if self.position_embedding == "rope" and self.d_k % 2:
      raise ValueError(f"position_embedding='rope' needs an even d_k, got d_k={self.d_k}: "
                       f"set d_k explicitly or pick another n_heads")

  @classmethod
  def from_config(cls, cfg, backend=None):
    """Takes the model fields of a finalized config; attention_impl depends on the backend."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"attention_impl", "quant"}
    impl = config_lib.flash_attention_backend(cfg, backend or jax.default_backend())
    quant = "int8" if cfg.load_in_8bit else cfg.quant_type if cfg.load_in_4bit else ""
    return cls(**{f: cfg[f] for f in fields}, attention_impl=impl, quant=quant)

  @property
  def has_qkv_bias(self):
    return self.use_bias if self.qkv_bias is None else self.qkv_bias

  @property
  def rope_inv_freq(self):
    """[d_k / 2] RoPE inverse frequencies with this config's scaling (see attention.py)."""
    return attn_lib.rope_frequencies(
        self.d_k, self.rope_theta, self.rope_scaling, factor=self.rope_scaling_factor,
        low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
        original_max_len=self.rope_original_max_len, beta_fast=self.rope_beta_fast,
        beta_slow=self.rope_beta_slow, truncate=self.rope_truncate)

  def rope_inv_freq_at(self, positions_BT):
    """[d_k / 2] inverse frequencies for a call at these positions: dynamic NTK's depend on its
    largest position (attention.dynamic_ntk_frequencies), the others' are static."""
    if self.rope_scaling == "dynamic":
      return attn_lib.dynamic_ntk_frequencies(
          self.d_k, self.rope_theta, self.rope_scaling_factor, self.rope_original_max_len,
          jnp.max(positions_BT) + 1)
    return self.rope_inv_freq

  @property
  def rope_cos_sin_factor(self):
    """What RoPE multiplies cos and sin by: YaRN's attention factor, else 1."""
    return attn_lib.rope_attention_factor(
        self.rope_scaling, self.rope_scaling_factor, self.rope_attention_factor,
        self.rope_mscale, self.rope_mscale_all_dim)

  @property
  def padded_vocab(self):
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)
