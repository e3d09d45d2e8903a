"""The transformer's building blocks as Flax modules: norms, the feed-forward network and
multi-head (grouped-query) self-attention with its KV-cache step.

Every parameter carries logical axis names ("embed", "heads", "kv_heads", "head_dim", "mlp",
"vocab") so `sharding.py` can map them onto a mesh. Projections are `nn.Einsum` with 3-D
kernels rather than `nn.DenseGeneral`, whose multi-dim features crash under logical
partitioning (flax issue #3676). Initialisation follows GPT-2: normal(0.02), with the two
projections that write into the residual stream scaled by 1/sqrt(2 * n_layers).
"""

import functools
import math

import flax.linen as nn
import jax.numpy as jnp

from llm_jax import attention as attn_lib
from llm_jax import context_parallel
from llm_jax import ring_cache
from llm_jax.model_config import ModelConfig

INIT_STD = 0.02


def init(axes, std=INIT_STD):
  """normal(std) initializer tagged with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def residual_std(cfg):
  """Init std of projections into the residual stream (GPT-2's 1/sqrt(2 * n_layers) scaling)."""
  return INIT_STD / math.sqrt(2 * cfg.n_layers)


def norm(cfg, name):
  """LayerNorm, or RMSNorm when cfg.use_rms_norm; statistics in float32, params "scale"/"bias"."""
  kw = dict(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            name=name)
  if cfg.use_rms_norm:
    return nn.RMSNorm(**kw)
  return nn.LayerNorm(**kw, use_bias=cfg.use_bias, bias_init=zeros(("embed",)))


def relu2(x):
  """Squared ReLU (So et al., Primer): relu(x) ** 2."""
  return jnp.square(nn.relu(x))


def head_norm(cfg, name):
  """RMSNorm over each head's features (qk_norm): a learned scale per head dim, shared by heads."""
  return nn.RMSNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                    param_dtype=cfg.weight_dtype, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                            ("head_dim",)))


class Mlp(nn.Module):
  """Position-wise FFN: relu / gelu (tanh approx., GPT-2) / gelu_exact (erf) / relu2 or SwiGLU,
  then hidden_dropout.

  SwiGLU uses d_ff as its hidden width (so it has 1.5x the FFN parameters of relu/gelu).
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg

    def dense(shape, axes, name, std=INIT_STD):
      return nn.Einsum(shape, "btd,df->btf", use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                       param_dtype=cfg.weight_dtype, kernel_init=init(axes, std),
                       bias_init=zeros(axes[-1:]), name=name)

    up = ((cfg.d_model, cfg.d_ff), ("embed", "mlp"))
    if cfg.activation == "swiglu":
      h_BTF = nn.silu(dense(*up, "wi_gate")(x_BTD)) * dense(*up, "wi_up")(x_BTD)
    else:
      act = {"relu": nn.relu, "gelu": nn.gelu,  # gelu: tanh approximation (GPT-2's gelu_new)
             "gelu_exact": functools.partial(nn.gelu, approximate=False),
             "relu2": relu2}[cfg.activation]
      h_BTF = act(dense(*up, "wi")(x_BTD))
    y_BTD = dense((cfg.d_ff, cfg.d_model), ("mlp", "embed"), "wo", residual_std(cfg))(h_BTF)
    return nn.Dropout(cfg.hidden_dropout)(y_BTD, deterministic=self.deterministic)


class SelfAttention(nn.Module):
  """Causal grouped-query self-attention with separate d_k / d_v and an optional KV-cache step.

  cache: the whole model's {"k": [L, B, S, K, H], "v": [L, B, S, K, Hv]} or None; this layer
  writes and reads index `layer` (an int32 scalar, traced under nn.scan) of it.
  ctx (shared by all layers): "positions" [B, T] for RoPE, "mask" (bool [B|1, 1, T, S] or None),
  "segment_ids" [B, T] or None, "cache_index" (scalar slot of this call's first token, decoding
  only), "rope_inv_freq" (optional: the RoPE frequencies of this call, cfg.rope_inv_freq_at).
  Without a cache the attention is causal over this call's tokens (within cfg.sliding_window);
  with one, the caller's mask already encodes which cache slots each query may see, and a cache
  no longer than cfg.sliding_window is a ring buffer (ring_cache.py).
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, cache, layer, ctx):
    cfg = self.cfg

    def proj(shape, spec, axes, name, std=INIT_STD, bias_axes=None, use_bias=cfg.use_bias):
      return nn.Einsum(shape, spec, use_bias=use_bias, dtype=cfg.compute_dtype,
                       param_dtype=cfg.weight_dtype, kernel_init=init(axes, std),
                       bias_init=zeros(bias_axes or axes[1:]), name=name)

    d, n, k, hk, hv = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_k, cfg.d_v
    qkv_bias = cfg.has_qkv_bias  # Qwen2: biased q/k/v, unbiased out and MLP
    q_BTNH = proj((d, n, hk), "btd,dnh->btnh", ("embed", "heads", "head_dim"), "query",
                  use_bias=qkv_bias)(x_BTD)
    k_BTKH = proj((d, k, hk), "btd,dkh->btkh", ("embed", "kv_heads", "head_dim"), "key",
                  use_bias=qkv_bias)(x_BTD)
    v_BTKH = proj((d, k, hv), "btd,dkh->btkh", ("embed", "kv_heads", "head_dim"), "value",
                  use_bias=qkv_bias)(x_BTD)
    if cfg.qk_norm:  # per head, over head_dim, before RoPE (as Qwen 3 and Gemma 3)
      q_BTNH = head_norm(cfg, "query_norm")(q_BTNH)
      k_BTKH = head_norm(cfg, "key_norm")(k_BTKH)
    if cfg.position_embedding == "rope":
      inv_freq_h, factor = ctx.get("rope_inv_freq"), cfg.rope_cos_sin_factor
      if inv_freq_h is None:
        inv_freq_h = cfg.rope_inv_freq_at(ctx["positions"])
      q_BTNH = attn_lib.rope(q_BTNH, ctx["positions"], cfg.rope_theta, inv_freq_h, factor)
      k_BTKH = attn_lib.rope(k_BTKH, ctx["positions"], cfg.rope_theta, inv_freq_h, factor)

    window = None
    if cache is None:
      k_BSKH, v_BSKH, is_causal, segment_ids = k_BTKH, v_BTKH, True, ctx["segment_ids"]
      window = cfg.sliding_window
    else:  # the caller's mask holds the window (and a ring's layout: model.py)
      write = (ring_cache.update if ring_cache.is_ring(cfg.sliding_window, cache["k"].shape[2])
               else attn_lib.update_cache)
      k_cache, k_BSKH = write(cache["k"], k_BTKH, layer, ctx["cache_index"])
      v_cache, v_BSKH = write(cache["v"], v_BTKH, layer, ctx["cache_index"])
      cache, is_causal, segment_ids = {"k": k_cache, "v": v_cache}, False, None

    rate = 0.0 if self.deterministic else cfg.attention_dropout
    # The probabilities are formed and sown only when the caller makes "intermediates" mutable
    # (experiments/attention.py); training and sampling never do, so they keep the fused kernels.
    want_probs = self.is_mutable_collection("intermediates")
    index_T, mask = ctx.get("context_index"), ctx["mask"]
    if index_T is not None and cache is None and not (rate > 0 or want_probs):
      out_BTNH = context_parallel.attention(
          q_BTNH, k_BSKH.astype(cfg.compute_dtype), v_BSKH.astype(cfg.compute_dtype), index_T,
          segment_ids, impl=cfg.context_parallel_impl, load_balance=cfg.context_load_balance,
          sliding_window=window)
    else:
      if index_T is not None and cache is None:
        # Dropout or probabilities on a context-parallel layout: plain attention (the
        # partitioner gathers), causal by the tokens' original order rather than their slots.
        index_T = jnp.asarray(index_T)
        behind_TT = index_T[:, None] - index_T[None, :]  # query's index - key's index
        allowed_TT = (behind_TT >= 0) & (behind_TT < (window or behind_TT.shape[0] + 1))
        mask, is_causal, window = allowed_TT[None, None], False, None
      out_BTNH = attn_lib.attention(
          q_BTNH, k_BSKH.astype(cfg.compute_dtype), v_BSKH.astype(cfg.compute_dtype), mask,
          impl=cfg.attention_impl, is_causal=is_causal, segment_ids_BT=segment_ids,
          dropout_rate=rate, dropout_rng=self.make_rng("dropout") if rate > 0 else None,
          return_probs=want_probs, window=window)
    if want_probs:
      out_BTNH, probs_BNTS = out_BTNH
      self.sow("intermediates", "attention_probs", probs_BNTS)
    y_BTD = proj((n, hv, d), "btnh,nhd->btd", ("heads", "head_dim", "embed"), "out",
                 residual_std(cfg), bias_axes=("embed",))(out_BTNH)
    return y_BTD, cache
