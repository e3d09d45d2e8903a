"""A KV cache of a sliding window's size: a ring buffer, so decoding memory stays bounded however
long the generation.

With `sliding_window` W, a query at slot q reads only the keys at slots (q - W, q], so a cache of
W entries suffices: slot a lives at entry a % W, and writing slot a overwrites slot a - W, which
no later query reads. The caller keeps counting slots from 0 upwards (cache_index, kv_valid_BS
over all slots: a bool per slot, not a key per slot); these functions turn slots into entries.

A call of T tokens at slot c attends to:
  T == 1 (a decode step): the ring after writing the new key in place at entry c % W. Entry j
    then holds slot c - ((c - j) mod W), which is in (c - W, c]; a negative one was never written.
  T > 1 (a prefill, perhaps longer than W): the ring as it was (entry j: the latest slot below c,
    c - 1 - ((c - 1 - j) mod W)) followed by the T new keys; then the last min(T, W) new keys are
    written. Reading before writing keeps the keys that the first of the T queries still needs.
The model builds its mask from `key_slots` (model.py); a cache is a ring when the model has a
sliding window and the cache is no longer than it (`is_ring`): a shorter one never wraps (the
sampler sizes it min(W, prompt + new tokens)), so it reads the same as a plain cache.
"""

import jax
import jax.numpy as jnp


def length(window, needed: int) -> int:
  """Entries a decode of `needed` slots allocates: min(window, needed) (window None: needed)."""
  return needed if window is None else min(window, needed)


def is_ring(window, cache_len: int) -> bool:
  """Whether a cache of `cache_len` entries is read as a ring (static: shapes and config)."""
  return window is not None and cache_len <= window


def key_slots(index, t: int, size: int):
  """[size] (T == 1) or [size + T] int32: the slot of each key a T-token call at slot `index`
  attends to, in the order `update` returns them; negative = an entry never written."""
  j = jnp.arange(size)
  if t == 1:
    return index - jnp.mod(index - j, size)
  ring = index - 1 - jnp.mod(index - 1 - j, size)
  return jnp.concatenate([ring, index + jnp.arange(t)])


def update(cache_LBWKH, new_BTKH, layer, index):
  """Writes a T-token call's keys (or values) at slot `index` into layer `layer` of the ring.

  Returns (new cache, the [B, S', K, H] keys the call attends to, in `key_slots` order).
  """
  size, t = cache_LBWKH.shape[2], new_BTKH.shape[1]
  new_BTKH = new_BTKH.astype(cache_LBWKH.dtype)
  if t == 1:  # in place, as attention.update_cache (the decode loop's donated cache)
    cache_LBWKH = jax.lax.dynamic_update_slice(
        cache_LBWKH, new_BTKH[None], (layer, 0, jnp.mod(index, size), 0, 0))
    return cache_LBWKH, jax.lax.dynamic_index_in_dim(cache_LBWKH, layer, keepdims=False)
  old_BWKH = jax.lax.dynamic_index_in_dim(cache_LBWKH, layer, keepdims=False)
  keys_BSKH = jnp.concatenate([old_BWKH, new_BTKH], axis=1)
  kept = min(t, size)  # consecutive slots, so distinct entries
  entries = jnp.mod(index + t - kept + jnp.arange(kept), size)
  ring_BWKH = old_BWKH.at[:, entries].set(new_BTKH[:, t - kept:])
  cache_LBWKH = jax.lax.dynamic_update_slice(cache_LBWKH, ring_BWKH[None], (layer, 0, 0, 0, 0))
  return cache_LBWKH, keys_BSKH
