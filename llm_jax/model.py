"""The GPT model: token (+ position) embedding -> pre-norm blocks -> final norm -> float32 logits.

Owns the `Transformer` module, `build` (the module with the LoRA adapters and quantized weights
the config asks for), `init_params` and the explicit KV cache (`init_cache`). Its `ModelConfig`
(the model's slice of the flat config) lives in model_config.py, which layers.py reads too;
`model.ModelConfig` is the same class.

The cache is a plain pytree {"k": [L, B, S, K, H], "v": [L, B, S, K, Hv]}: easy to shard, donate
and scan over. The caller owns the write position (`cache_index`, one slot for the whole batch)
and the per-row RoPE/learned positions, so left-padded prompts work: `kv_valid_BS` marks their
padding slots False.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax import attention as attn_lib
from llm_jax import context_parallel
from llm_jax import layers
from llm_jax import ring_cache
from llm_jax.model_config import ModelConfig  # pylint: disable=unused-import  (the model's API)

PADDED_LOGIT = -1e9  # logits of padded vocab ids: exp() underflows to exactly 0 in float32
ACTIVATION_AXES = ("batch", "length", "embed")


class Block(nn.Module):
  """Pre-norm block: x + dropout(attn(norm(x))), then x + mlp(norm(x)).

  Scan-shaped: carry (x, cache, layer) -> (x, cache, layer + 1). The whole-model cache rides in
  the carry (not as a per-layer scanned input) so each layer's write is in place.
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, carry, ctx):
    cfg = self.cfg
    x_BTD, cache, layer = carry
    x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
    h_BTD, cache = layers.SelfAttention(cfg, self.deterministic, name="attn")(
        layers.norm(cfg, "attn_norm")(x_BTD), cache, layer, ctx)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout)(h_BTD, deterministic=self.deterministic)
    x_BTD = x_BTD + layers.Mlp(cfg, self.deterministic, name="mlp")(
        layers.norm(cfg, "mlp_norm")(x_BTD))
    return (nn.with_logical_constraint(x_BTD, ACTIVATION_AXES), cache, layer + 1), None


def _block_class(cfg):
  """Block wrapped in gradient checkpointing per cfg.remat_policy."""
  if cfg.remat_policy == "none":
    return Block
  # "dots" keeps the weight matmuls' outputs and recomputes the attention scores/softmax,
  # whose [B, N, T, S] tensors are what dominates activation memory.
  policy = {"full": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[cfg.remat_policy]
  return nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=policy)


class Transformer(nn.Module):
  """Decoder-only transformer. See the module docstring for the cache contract."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, deterministic=True,
               cache=None, cache_index=None, kv_valid_BS=None):
    """No cache: logits [B, T, padded_vocab] float32. With a cache: (logits, new_cache)."""
    cfg = self.cfg
    b, t = tokens_BT.shape
    decoding = cache is not None
    if decoding and (cache_index is None or segment_ids_BT is not None):
      raise ValueError("decoding with a cache needs cache_index (the slot of the first token) "
                       "and takes no segment_ids (mask padding with kv_valid_BS instead)")
    start = cache_index if decoding else 0
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    # Context parallelism (a training-shaped call under a mesh whose rules put "length" on a
    # context axis > 1): tokens, positions and segment ids go into the load-balanced slot order
    # here, the last hidden states come back before the logits (context_parallel.py).
    cp = (None if decoding or kv_valid_BS is not None
          else context_parallel.layout(t, cfg.context_load_balance))
    if cp is not None and cfg.context_load_balance:
      order_T = cp[0]
      tokens_BT, positions_BT = tokens_BT[:, order_T], positions_BT[:, order_T]
      if segment_ids_BT is not None:
        segment_ids_BT = segment_ids_BT[:, order_T]

    embed = nn.Embed(cfg.padded_vocab, cfg.d_model, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype,
                     embedding_init=layers.init(("vocab", "embed")), name="embed")
    x_BTD = embed(tokens_BT)
    if cfg.position_embedding == "sinusoidal":
      # Vaswani et al. scale the embeddings so the unit-amplitude sinusoids do not drown them.
      pe_BTD = attn_lib.sinusoidal_embedding(positions_BT, cfg.d_model)
      x_BTD = x_BTD * math.sqrt(cfg.d_model) + pe_BTD.astype(x_BTD.dtype)
    elif cfg.position_embedding == "learned":
      # Clipped so padding positions (< 0) never index outside the table (jnp.take gives NaN).
      pos_BT = jnp.clip(positions_BT, 0, cfg.max_position_embeddings - 1)
      x_BTD = x_BTD + nn.Embed(cfg.max_position_embeddings, cfg.d_model,
                               dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                               embedding_init=layers.init((None, "embed")),
                               name="pos_embed")(pos_BT)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)

    # Masks (and RoPE tables) are built once here and shared by every layer.
    if decoding:
      q_slots_T = start + jnp.arange(t)
      s = cache["k"].shape[2]
      if ring_cache.is_ring(cfg.sliding_window, s):
        k_slots_S = ring_cache.key_slots(start, t, s)
        mask = ((k_slots_S >= 0) & (k_slots_S[None, :] <= q_slots_T[:, None]))[None, None]
        valid_BS = None if kv_valid_BS is None else jnp.take(
            kv_valid_BS, jnp.clip(k_slots_S, 0, kv_valid_BS.shape[1] - 1), axis=1)
      else:
        k_slots_S, valid_BS = jnp.arange(s), kv_valid_BS
        mask = attn_lib.causal_mask(q_slots_T, s)
      mask = attn_lib.combine_masks(
          mask, attn_lib.sliding_window(q_slots_T, k_slots_S, cfg.sliding_window))
      if valid_BS is not None:
        mask = mask & attn_lib.valid_mask(valid_BS, q_slots_T, k_slots_S)
    else:
      mask = None if kv_valid_BS is None else attn_lib.valid_mask(kv_valid_BS, jnp.arange(t))
    inv_freq = cfg.rope_inv_freq_at(positions_BT) if cfg.position_embedding == "rope" else None
    ctx = {"positions": positions_BT, "mask": mask, "segment_ids": segment_ids_BT,
           "cache_index": cache_index, "rope_inv_freq": inv_freq,
           "context_index": None if cp is None else cp[0]}

    block_cls = _block_class(cfg)
    carry = (x_BTD, cache, jnp.zeros((), jnp.int32))
    if cfg.scan_layers:
      # "intermediates" (attention probabilities, when asked for) stack per layer like params.
      stack = nn.scan(block_cls, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                      length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      carry, _ = stack(cfg, deterministic, name="layers")(carry, ctx)
    else:
      for i in range(cfg.n_layers):
        carry, _ = block_cls(cfg, deterministic, name=f"blocks_{i}")(carry, ctx)
    x_BTD, cache, _ = carry
    if cp is not None and cfg.context_load_balance:
      x_BTD = nn.with_logical_constraint(x_BTD[:, cp[1]], ACTIVATION_AXES)

    x_BTD = layers.norm(cfg, "final_norm")(x_BTD)
    if cfg.tie_embeddings:
      logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, embed.embedding.astype(cfg.compute_dtype),
                              preferred_element_type=jnp.float32)
    else:
      logits_BTV = nn.Einsum((cfg.d_model, cfg.padded_vocab), "btd,dv->btv", use_bias=False,
                             dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                             kernel_init=layers.init(("embed", "vocab")),
                             preferred_element_type=jnp.float32, name="lm_head")(x_BTD)
    logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32),
                                            ("batch", "length", "vocab"))
    if cfg.padded_vocab > cfg.vocab_size:
      real_V = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
      logits_BTV = jnp.where(real_V, logits_BTV, PADDED_LOGIT)
    return (logits_BTV, cache) if decoding else logits_BTV


def build(cfg: ModelConfig):
  """The model `cfg` describes, for `.init` and `.apply`: the Transformer, as qwix's quantized twin
  when cfg.quant (quantize.py) and with LoRA adapters on its projections when cfg.lora_r (lora.py).
  """
  model = Transformer(cfg)
  if cfg.quant:
    from llm_jax import quantize  # pylint: disable=g-import-not-at-top  (they wrap this module)
    model = quantize.wrap(model, cfg)
  if cfg.lora_r:
    from llm_jax import lora  # pylint: disable=g-import-not-at-top
    model = lora.wrap(model, cfg)
  return model


def init_cache(cfg: ModelConfig, batch, max_len, dtype=None):
  """Zeroed KV cache {"k": [L, B, S, K, H], "v": [L, B, S, K, Hv]} (dtype None = compute dtype).

  S = max_len; with a sliding window, one of at most its length is a ring buffer (ring_cache.py;
  the sampler asks for ring_cache.length(window, slots)).
  """
  dtype = cfg.compute_dtype if dtype is None else dtype
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads)
  return {"k": jnp.zeros(shape + (cfg.d_k,), dtype), "v": jnp.zeros(shape + (cfg.d_v,), dtype)}


def cache_logical_axes():
  """Logical axis names of the cache arrays (for sharding it like the activations)."""
  axes = ("layers", "batch", "length", "kv_heads", "head_dim")
  return {"k": axes, "v": axes}


def _boxed_init(cfg, rng):
  return Transformer(cfg).init({"params": rng}, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(cfg: ModelConfig, rng):
  """Freshly initialised parameters as plain arrays (logical axis boxes removed)."""
  return nn.meta.unbox(jax.jit(_boxed_init, static_argnums=0)(cfg, rng))


def param_logical_axes(cfg: ModelConfig):
  """PartitionSpecs of logical axis names, same tree as `init_params` (no arrays allocated)."""
  return nn.get_partition_spec(jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0)))
