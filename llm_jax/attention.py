"""Attention math as pure functions: scaled dot-product attention (XLA, cuDNN, Pallas), RoPE
and its long-context scalings, sinusoidal positions, attention masks (causal, sliding window,
segments, padding) and the KV-cache write (a ring buffer's: ring_cache.py).

Everything here is a plain function of arrays, so it is tested against numpy references without
building a module. Masks are bool, True = attend, shaped [B or 1, 1, T, S]; "slots" are key
positions in the (cache) sequence, which differ from the RoPE positions of left-padded rows.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Finite rather than -inf: a row with every key masked then softmaxes to a uniform (finite) row
# instead of NaN, and a NaN would leak into every row through 0 * NaN in probs @ v.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_PALLAS_BLOCK = 128  # the TPU kernel's default block size; T must be a multiple of it


def causal_mask(q_slots_T, kv_len):
  """[1, 1, T, S] bool: query t may see key slot s iff s <= q_slots_T[t]."""
  return (jnp.arange(kv_len)[None, :] <= q_slots_T[:, None])[None, None]


def sliding_window(q_slots_T, k_slots_S, window):
  """[B or 1, 1, T, S] bool: key slot s is within the `window` slots ending at the query's,
  q - window < s (Mistral's and Gemma's definition: `window` keys, the query's own included).

  Only the window's lower edge: AND it with a causal mask. Slots may be [T] / [S] or per row
  [B, T] / [B, S] (a ring-buffer cache, a shard of the sequence); window None = no limit (None).
  """
  if window is None:
    return None
  q_slots_T, k_slots_S = jnp.asarray(q_slots_T), jnp.asarray(k_slots_S)
  out = k_slots_S[..., None, :] > q_slots_T[..., :, None] - window
  return out.reshape((-1, 1) + out.shape[-2:])


def segment_mask(q_segment_ids_BT, kv_segment_ids_BS):
  """[B, 1, T, S] bool: attend only within equal segment ids (packed documents)."""
  return (q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :])[:, None]


def valid_mask(kv_valid_BS, q_slots_T, k_slots_S=None):
  """[B, 1, T, S] bool: key slot s is valid (not left padding), or is the query's own slot.

  The own-slot exception only matters for padding queries: they would otherwise see no key at
  all; their outputs are never read, but must stay finite. k_slots_S: the slot of each key when
  they are not 0 .. S-1 (a ring-buffer cache; kv_valid_BS then is per key, not per slot).
  """
  if k_slots_S is None:
    k_slots_S = jnp.arange(kv_valid_BS.shape[1])
  own_TS = k_slots_S[None, :] == q_slots_T[:, None]
  return (kv_valid_BS[:, None, :] | own_TS[None])[:, None]


def combine_masks(*masks):
  """Logical AND of the masks that are not None (None if all are None)."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out


def update_cache(cache_LBSKH, new_BTKH, layer, index):
  """Writes `new_BTKH` into layer `layer`, slots [index, index + T) of the whole-model cache.

  Updating the full [L, ...] array (rather than a per-layer slice that is then put back) lets
  XLA do it in place on a donated cache: the slice-and-set form copied every layer each step.
  Returns (new cache, this layer's [B, S, K, H] view of it).
  """
  cache_LBSKH = jax.lax.dynamic_update_slice(
      cache_LBSKH, new_BTKH[None].astype(cache_LBSKH.dtype), (layer, 0, index, 0, 0))
  return cache_LBSKH, jax.lax.dynamic_index_in_dim(cache_LBSKH, layer, keepdims=False)


def rope_frequencies(head_dim, theta, scaling="none", factor=None, low_freq_factor=None,
                     high_freq_factor=None, original_max_len=None, beta_fast=None,
                     beta_slow=None, truncate=None):
  """[head_dim / 2] float32 RoPE inverse frequencies theta^(-2j/H), scaled for longer contexts.

  The scalings are transformers' (`modeling_rope_utils.py`), with its parameter names:
  "linear" divides every frequency by `factor` (position interpolation: positions / factor).
  "llama3" (Llama 3.1+) divides only the low frequencies: a wavelength 2*pi/f longer than
  original_max_len / low_freq_factor is divided by `factor`, one shorter than
  original_max_len / high_freq_factor is kept, and those in between blend the two smoothly
  (`_compute_llama3_parameters`). "yarn" blends interpolated (f / factor) and original
  frequencies by a linear ramp over the dimensions that turn between beta_slow (default 1) and
  beta_fast (default 32) times within original_max_len (`_compute_yarn_parameters`; its
  attention factor is `rope_attention_factor`). "dynamic" depends on the current length: see
  `dynamic_ntk_frequencies`; here it is the unscaled table (its value up to original_max_len).
  Computed in float64 numpy (the config is static).
  """
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling == "linear":
    inv_freq = inv_freq / factor
  elif scaling == "llama3":
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original_max_len / wavelen - low_freq_factor)
              / (high_freq_factor - low_freq_factor))
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelen > original_max_len / low_freq_factor, inv_freq / factor,
                        np.where(wavelen < original_max_len / high_freq_factor, inv_freq, blended))
  elif scaling == "yarn":
    def correction_dim(rotations):  # the dimension that turns `rotations` times in the context
      return (head_dim * math.log(original_max_len / (rotations * 2 * math.pi))
              / (2 * math.log(theta)))
    low, high = correction_dim(beta_fast or 32), correction_dim(beta_slow or 1)
    if truncate is None or truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high  # transformers' guard against 0 / 0
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the original frequency (fast dims), 0: interpolated (slow dims)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
  elif scaling not in ("none", "dynamic"):
    raise ValueError(f"rope scaling {scaling!r} is not one of none, linear, dynamic, yarn, llama3")
  return inv_freq.astype(np.float32)


def rope_attention_factor(scaling, factor=None, attention_factor=None, mscale=None,
                          mscale_all_dim=None):
  """The factor YaRN multiplies cos and sin by (so q . k by its square); 1.0 for the others.

  As transformers: `attention_factor` when given, else 0.1 * mscale * ln(factor) + 1 ratios
  (mscale / mscale_all_dim, DeepSeek's spelling) when both are given, else 0.1 ln(factor) + 1.
  """
  if scaling != "yarn":
    return 1.0
  if attention_factor is not None:
    return float(attention_factor)

  def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if mscale and mscale_all_dim:
    return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
  return get_mscale(factor)


def dynamic_ntk_frequencies(head_dim, theta, factor, original_max_len, seq_len):
  """[head_dim / 2] float32 dynamic-NTK inverse frequencies for a traced current length.

  transformers' `_compute_dynamic_ntk_parameters`: past original_max_len the base grows to
  theta * (factor * L / original_max_len - (factor - 1)) ** (H / (H - 2)) with L = seq_len (the
  largest position + 1 of the call, as its `dynamic_rope_update` takes it); up to
  original_max_len it is theta. With a KV cache each key keeps the rotation of the step that
  wrote it, as transformers' generate does.
  """
  seq_len = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(original_max_len))
  base = theta * (factor * seq_len / original_max_len - (factor - 1)) ** (head_dim / (head_dim - 2))
  return 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def rope(x_BTNH, positions_BT, theta, inv_freq_h=None, attention_factor=1.0):
  """Rotary position embedding (rotate-half form), computed in float32.

  Pairs feature j with j + H/2 and rotates the pair by positions * theta^(-2j/H) (or by
  positions * inv_freq_h[j], from `rope_frequencies`, when given), so the dot product of a
  rotated query and key depends only on their position difference. H must be even.
  attention_factor scales cos and sin (YaRN's, see `rope_attention_factor`).
  This is Hugging Face Llama's `rotate_half` layout: its q/k weights load without permutation.
  """
  h = x_BTNH.shape[-1]
  if h % 2:
    raise ValueError(f"RoPE needs an even head dim, got {h}")
  if inv_freq_h is None:
    inv_freq_h = rope_frequencies(h, theta)
  angle_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h, jnp.float32)
  sin_BT1h, cos_BT1h = jnp.sin(angle_BTh)[:, :, None], jnp.cos(angle_BTh)[:, :, None]
  if attention_factor != 1.0:
    sin_BT1h, cos_BT1h = sin_BT1h * attention_factor, cos_BT1h * attention_factor
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h], axis=-1)
  return out.astype(x_BTNH.dtype)


def sinusoidal_embedding(positions_BT, d_model):
  """[B, T, d_model] float32: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(same).

  Computed from the positions directly, so there is no table length limit.
  """
  two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)
  angle_BTi = positions_BT.astype(jnp.float32)[..., None] / (10000.0 ** (two_i / d_model))
  pe = jnp.stack([jnp.sin(angle_BTi), jnp.cos(angle_BTi)], axis=-1)  # sin, cos interleaved
  return pe.reshape(*positions_BT.shape, -1)[..., :d_model]


def sinusoidal_table(n_pos, d_model):
  """[n_pos, d_model] float32: the cheat sheet's positional-encoding table."""
  return sinusoidal_embedding(jnp.arange(n_pos)[None], d_model)[0]


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask=None, *, dropout_rate=0.0, dropout_rng=None,
                  return_probs=False):
  """softmax(q k^T / sqrt(d_k) + mask) v with grouped kv heads; scores and softmax in float32.

  q head n reads kv head n // (N / K). Returns [B, T, N, Hv] in q's dtype, and with return_probs
  also the probabilities [B, N, T, S] float32 (before attention dropout).
  """
  b, t, n, h = q_BTNH.shape
  kv_heads = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, kv_heads, n // kv_heads, h)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) / math.sqrt(h)
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    scores_BKGTS = jnp.where(mask[:, :, None], scores_BKGTS, _MASKED)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BKGTS.shape)
    probs_BKGTS = jnp.where(keep, probs_BKGTS / (1.0 - dropout_rate), 0.0)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH)
  out_BTNH = out_BTKGH.reshape(b, t, n, v_BSKH.shape[-1]).astype(q_BTNH.dtype)
  if return_probs:
    return out_BTNH, probs_BKGTS.reshape(b, n, t, -1)
  return out_BTNH


def _pallas_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
  """Causal self-attention with the TPU Pallas flash kernel (T == S, a multiple of 128).

  XLA cannot partition a Pallas (Mosaic) kernel, so under a multi-device mesh it runs per shard
  inside shard_map, split over batch and heads as the activations are (rows and heads attend
  independently).
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # TPU-only module
  from llm_jax import sharding  # late: sharding imports flax, unneeded by the pure functions
  n, k_heads = q_BTNH.shape[2], k_BSKH.shape[2]
  # The kernel wants [B, N, T, H] and the same head count for q, k and v.
  k_BSNH = jnp.repeat(k_BSKH, n // k_heads, axis=2)
  v_BSNH = jnp.repeat(v_BSKH, n // k_heads, axis=2)
  scale = 1.0 / math.sqrt(q_BTNH.shape[-1])

  def kernel(q_BTNH, k_BSNH, v_BSNH, *segment_ids_BT):
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q_BTNH, k_BSNH, v_BSNH))
    segments = (fa.SegmentIds(q=segment_ids_BT[0], kv=segment_ids_BT[0]) if segment_ids_BT
                else None)
    out_BNTH = fa.flash_attention(q, k, v, segment_ids=segments, causal=True, sm_scale=scale)
    return jnp.swapaxes(out_BNTH, 1, 2).astype(q_BTNH.dtype)

  args = (q_BTNH, k_BSNH, v_BSNH) + (() if segment_ids_BT is None else (segment_ids_BT,))
  spec = sharding.context_spec(("batch", "length", "heads", "head_dim"), q_BTNH.shape)
  if spec is None:
    return kernel(*args)
  specs = (spec,) * 3 + (() if segment_ids_BT is None else (jax.sharding.PartitionSpec(*spec[:2]),))
  return jax.shard_map(kernel, in_specs=specs, out_specs=spec, check_vma=False)(*args)


def attention(q_BTNH, k_BSKH, v_BSKH, mask=None, *, impl="xla", is_causal=False,
              segment_ids_BT=None, dropout_rate=0.0, dropout_rng=None, return_probs=False,
              window=None):
  """Scaled dot-product attention, 1/sqrt(d_k), on the chosen backend.

  q: [B, T, N, H], k: [B, S, K, H], v: [B, S, K, Hv] with N % K == 0.
  mask: bool, True = attend, broadcastable to [B, 1, T, S], or None.
  is_causal: also apply the causal mask s <= t (self-attention, T == S, no cache offset).
  segment_ids_BT: also attend only within equal ids (self-attention, T == S).
  window: with is_causal, also only the `window` keys ending at the query (`sliding_window`);
  None = full causal. cuDNN takes it natively; the Pallas flash kernel cannot (ValueError).
  impl: "xla" | "cudnn" (GPU, bf16/fp16) | "pallas" (TPU). Cases a fused kernel cannot do
  (attention dropout; for Pallas also an explicit mask, d_v != d_k or T not a multiple of 128)
  run on XLA, which gives the same result.
  return_probs: also return the probabilities [B, N, T, S] float32; fused kernels never form
  them, so this runs on XLA.
  Returns [B, T, N, Hv] in q's dtype (and the probabilities with return_probs).
  """
  t, s = q_BTNH.shape[1], k_BSKH.shape[1]
  if (is_causal or segment_ids_BT is not None) and t != s:
    raise ValueError(f"is_causal / segment_ids need self-attention (T == S), got T={t}, S={s}")
  if window is not None and not is_causal:
    raise ValueError("window needs is_causal (a cache's window goes in the mask: sliding_window)")
  if dropout_rate > 0.0 or return_probs:
    impl = "xla"
  if impl == "pallas" and window is not None:
    raise ValueError(f"the Pallas flash kernel has no sliding window (window={window}): use "
                     f"use_flash_attention=False for XLA attention")
  if impl == "pallas":
    if (is_causal and mask is None and t % _PALLAS_BLOCK == 0
        and k_BSKH.shape[-1] == v_BSKH.shape[-1]):
      return _pallas_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    impl = "xla"
  seg = None if segment_ids_BT is None else segment_mask(segment_ids_BT, segment_ids_BT)
  if impl == "cudnn":
    dtype = q_BTNH.dtype  # cuDNN needs one of bf16/fp16 for q, k and v alike
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype), mask=combine_masks(mask, seg),
        is_causal=is_causal, implementation="cudnn",
        local_window_size=None if window is None else (window - 1, 0))
  if impl != "xla":
    raise ValueError(f"attention impl={impl!r} is not one of xla, cudnn, pallas")
  causal = causal_mask(jnp.arange(t), s) if is_causal else None
  local = sliding_window(jnp.arange(t), jnp.arange(s), window) if is_causal else None
  return xla_attention(q_BTNH, k_BSKH, v_BSKH, combine_masks(mask, seg, causal, local),
                       dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                       return_probs=return_probs)
