"""Context parallelism: causal self-attention over a sequence sharded on the mesh's context axis.

The logical rules map the activations' "length" axis to the `context` mesh axis, so every
activation of a layer is split over the sequence; everything but attention is position-wise and
needs no communication. Attention runs per shard inside shard_map, in one of two ways
(`context_parallel_impl`):

- "all_gather": each device gathers every shard's K and V (and their token indices and segment
  ids) and attends its queries over the whole sequence: one collective per layer, memory O(S)
  per device for K/V and O(T/C x S) for the scores. MaxText's default.
- "ring": K/V blocks go round the context devices with ppermute, C steps, each query block
  folding in one K/V block with the online softmax (running max, sum and output, as flash
  attention): K/V memory O(S / C), scores O(T/C x S/C) per step. The backward pass is a second
  ring (custom_vjp): it recomputes each block's probabilities from the saved log-sum-exp and
  passes dK/dV round with their block, so nothing of size S is saved for it either. Block pairs
  that causality masks entirely are skipped (lax.cond).

Causal load balancing (`context_load_balance`): with contiguous shards, device 0's queries see
only its own block and the last device's see all of them, so a ring that skips masked blocks
idles most devices most of the time. Cut the sequence into 2C chunks and give device i chunks i
and 2C - 1 - i (a front and a back one, as MaxText and torchtitan do): every device then has the
same work at every ring step. The model permutes tokens, positions and segment ids into this
layout at its input and the last hidden states back before the logits (model.py), and attention
masks by each token's original index, which travels with its block as its segment id does.
Going in costs nothing (the token ids are replicated over context); coming out, the partitioner
gathers the last hidden states [B, T, D] once per step (one activation, not one per layer).

Everything here is a pure function of arrays with shape-suffixed names; `attention` is the
shard_map around them, called by layers.SelfAttention when the model's `ctx` carries
`context_index` (model.Transformer decides that once per call, from `layout`).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llm_jax import attention as attn_lib
from llm_jax import sharding

IMPLS = ("all_gather", "ring")
_MASKED = attn_lib._MASKED  # pylint: disable=protected-access  (the one masked-score value)


# ---------------------------------------------------------------------------- layout


def load_balanced_order_T(t: int, degree: int) -> np.ndarray:
  """[T] int32: the original token index at each slot of the load-balanced layout.

  The sequence is cut into 2 * degree chunks; slots [i * T/C, (i + 1) * T/C) (device i's shard)
  hold chunk i then chunk 2 * degree - 1 - i. T must be a multiple of 2 * degree.
  """
  chunks_Xc = np.arange(t, dtype=np.int32).reshape(2 * degree, t // (2 * degree))
  return np.concatenate([np.concatenate([chunks_Xc[i], chunks_Xc[2 * degree - 1 - i]])
                         for i in range(degree)])


def degree_in_context(t: int, load_balance: bool) -> int:
  """The context-parallel degree for a sequence of length t under the mesh and rules in context
  (jax.set_mesh + nn.logical_axis_rules): the context axis's size when the rules put "length"
  on it alone and t splits into its shards (2 chunks each with load balancing), else 1."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh is None or mesh.empty or not rules or sharding.CONTEXT_AXIS not in mesh.axis_names:
    return 1
  entry = nn.logical_to_mesh_axes(("length",), rules)[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  degree = mesh.shape[sharding.CONTEXT_AXIS]
  if axes != (sharding.CONTEXT_AXIS,) or degree <= 1 or t % (degree * (1 + load_balance)):
    return 1
  return degree


def layout(t: int, load_balance: bool):
  """(order_T, inverse_T) numpy int32 for a sequence of length t in this context: the original
  token index at each slot and its inverse permutation (both the identity without load
  balancing); None when context parallelism does not apply."""
  degree = degree_in_context(t, load_balance)
  if degree == 1:
    return None
  order_T = load_balanced_order_T(t, degree) if load_balance else np.arange(t, dtype=np.int32)
  return order_T, np.argsort(order_T).astype(np.int32)


# ---------------------------------------------------------------------- the math


def block_mask_B11TS(q_index_T, k_index_S, q_segment_ids_BT, k_segment_ids_BS,
                     sliding_window=None):
  """[B, 1, 1, T, S] bool: key s is visible to query t (causal by original token index, same
  segment, and within the window when one is given); broadcasts over [B, K, G, T, S]."""
  visible_TS = k_index_S[None, :] <= q_index_T[:, None]
  if sliding_window is not None:
    visible_TS &= q_index_T[:, None] - k_index_S[None, :] < sliding_window
  same_BTS = q_segment_ids_BT[:, :, None] == k_segment_ids_BS[:, None, :]
  return (visible_TS[None] & same_BTS)[:, None, None]


def _scores_BKGTS(q_BTKGH, k_BSKH):
  scale = 1.0 / math.sqrt(q_BTKGH.shape[-1])
  return jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                    preferred_element_type=jnp.float32) * scale


def online_softmax_step(state, q_BTKGH, k_BSKH, v_BSKH, mask_B11TS):
  """Folds one K/V block into the running (max m_BKGT, sum l_BKGT, output o_BKGTH), float32."""
  m_BKGT, l_BKGT, o_BKGTH = state
  s_BKGTS = jnp.where(mask_B11TS, _scores_BKGTS(q_BTKGH, k_BSKH), _MASKED)
  m_new_BKGT = jnp.maximum(m_BKGT, jnp.max(s_BKGTS, axis=-1))
  p_BKGTS = jnp.where(mask_B11TS, jnp.exp(s_BKGTS - m_new_BKGT[..., None]), 0.0)
  correction_BKGT = jnp.exp(m_BKGT - m_new_BKGT)
  l_BKGT = l_BKGT * correction_BKGT + jnp.sum(p_BKGTS, axis=-1)
  o_BKGTH = o_BKGTH * correction_BKGT[..., None] + jnp.einsum(
      "bkgts,bskh->bkgth", p_BKGTS.astype(v_BSKH.dtype), v_BSKH,
      preferred_element_type=jnp.float32)
  return m_new_BKGT, l_BKGT, o_BKGTH


def block_grads(q_BTKGH, k_BSKH, v_BSKH, do_BTKGH, lse_BKGT, delta_BKGT, mask_B11TS):
  """One block pair's (dq_BTKGH, dk_BSKH, dv_BSKH), float32, from the saved log-sum-exp
  (p = exp(s - lse)) and delta = rowsum(dO * O): flash attention's backward for one block."""
  scale = 1.0 / math.sqrt(q_BTKGH.shape[-1])
  s_BKGTS = _scores_BKGTS(q_BTKGH, k_BSKH)
  p_BKGTS = jnp.where(mask_B11TS, jnp.exp(s_BKGTS - lse_BKGT[..., None]), 0.0)
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  dv_BSKH = f32("bkgts,btkgh->bskh", p_BKGTS, do_BTKGH)
  dp_BKGTS = f32("btkgh,bskh->bkgts", do_BTKGH, v_BSKH)
  ds_BKGTS = p_BKGTS * (dp_BKGTS - delta_BKGT[..., None])
  dq_BTKGH = f32("bkgts,bskh->btkgh", ds_BKGTS, k_BSKH) * scale
  dk_BSKH = f32("bkgts,btkgh->bskh", ds_BKGTS, q_BTKGH) * scale
  return dq_BTKGH, dk_BSKH, dv_BSKH


def _chunks(x, n, axis=1):
  return jnp.split(x, n, axis=axis) if n > 1 else [x]


def _pair_visible(q_index_T, k_index_S, sliding_window):
  """Whether any key of the block is visible to any query: causal (the block's first key is
  not after the last query) and, with a window, the last key not beyond the first query's."""
  visible = k_index_S[0] <= q_index_T[-1]
  if sliding_window is not None:
    visible &= q_index_T[0] - k_index_S[-1] < sliding_window
  return visible


def _grouped(x_BTNH, kv_heads):
  b, t, n, h = x_BTNH.shape
  return x_BTNH.reshape(b, t, kv_heads, n // kv_heads, h)


def _ring(step_fn, carry, block, axis, degree):
  """`degree` ring steps: carry = step_fn(carry, block), the block handed to the next device
  with ppermute between steps. A fori_loop, so one step compiles whatever the degree."""
  perm = [(j, (j + 1) % degree) for j in range(degree)]

  def body(_, cb):
    carry, block = cb
    return step_fn(carry, block), jax.lax.ppermute(block, axis, perm)

  carry, block = jax.lax.fori_loop(0, degree - 1, body, (carry, block))
  return step_fn(carry, block)


def _tie(q_BTNH, *ids):
  """`ids` (token indices, segment ids) tied to the queries by an optimization barrier.

  Under nn.scan over layers the indices and segment ids are the same in every layer, so JAX
  hoists everything computed from them alone out of the layer loop, the masks broadcast to
  [B, K, G, T, S] included: a full-size mask per ring step and chunk pair, kept alive for the
  whole step (100+ GiB per device at 32k tokens). Tied to q they vary per layer, and each mask
  stays a fused comparison inside its block."""
  return jax.lax.optimization_barrier((q_BTNH, *ids))


def _ring_forward(q_BTNH, k_BSKH, v_BSKH, q_index_T, k_index_S, q_seg_BT, k_seg_BS, axis, degree,
                  n_chunks, sliding_window):
  """Per shard: (out_BTNH in q's dtype, lse_BKGT float32) after `degree` ring steps."""
  q_BTNH, q_index_T, k_index_S, q_seg_BT, k_seg_BS = _tie(q_BTNH, q_index_T, k_index_S, q_seg_BT,
                                                          k_seg_BS)
  b, t, n, _ = q_BTNH.shape
  kv_heads, hv = k_BSKH.shape[2], v_BSKH.shape[-1]
  g = n // kv_heads
  q_chunks = _chunks(_grouped(q_BTNH, kv_heads), n_chunks)
  qi_chunks, qs_chunks = _chunks(q_index_T, n_chunks, 0), _chunks(q_seg_BT, n_chunks)
  tc = t // n_chunks
  states = [(jnp.full((b, kv_heads, g, tc), _MASKED, jnp.float32),
             jnp.zeros((b, kv_heads, g, tc), jnp.float32),
             jnp.zeros((b, kv_heads, g, tc, hv), jnp.float32)) for _ in range(n_chunks)]

  def step(states, block):
    states = list(states)
    k_c, v_c, ki_c, ks_c = (_chunks(block[0], n_chunks), _chunks(block[1], n_chunks),
                            _chunks(block[2], n_chunks, 0), _chunks(block[3], n_chunks))
    for a in range(n_chunks):
      for c in range(n_chunks):
        mask = block_mask_B11TS(qi_chunks[a], ki_c[c], qs_chunks[a], ks_c[c], sliding_window)
        states[a] = jax.lax.cond(
            _pair_visible(qi_chunks[a], ki_c[c], sliding_window),
            lambda st, q=q_chunks[a], k=k_c[c], v=v_c[c], m=mask: online_softmax_step(
                st, q, k, v, m),
            lambda st: st, states[a])
    return tuple(states)

  states = _ring(step, tuple(states), (k_BSKH, v_BSKH, k_index_S, k_seg_BS), axis, degree)
  outs, lses = [], []
  for m_BKGT, l_BKGT, o_BKGTH in states:
    # l > 0 wherever a query sees a key (always its own); the guard keeps other rows finite.
    seen = l_BKGT > 0
    outs.append(o_BKGTH / jnp.where(seen, l_BKGT, 1.0)[..., None])
    lses.append(jnp.where(seen, m_BKGT + jnp.log(jnp.where(seen, l_BKGT, 1.0)), -_MASKED))
  o_BKGTH = jnp.concatenate(outs, axis=3)
  out_BTNH = jnp.einsum("bkgth->btkgh", o_BKGTH).reshape(b, t, n, hv).astype(q_BTNH.dtype)
  return out_BTNH, jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def ring_attention_local(q_BTNH, k_BSKH, v_BSKH, q_index_T, k_index_S, q_seg_BT, k_seg_BS,
                         axis, degree, n_chunks, sliding_window):
  """Causal attention of this shard's queries over every shard's keys, K/V passed round the
  `axis` ring (run inside shard_map). q: [B, T/C, N, H], k/v: [B, T/C, K, H|Hv], the token
  indices [T/C] and segment ids [B, T/C] of this shard's slots; n_chunks: 2 with load balancing
  (the shard is a front and a back chunk: masked pairs are skipped per chunk), else 1.
  Returns [B, T/C, N, Hv] in q's dtype."""
  return _ring_forward(q_BTNH, k_BSKH, v_BSKH, q_index_T, k_index_S, q_seg_BT, k_seg_BS, axis,
                       degree, n_chunks, sliding_window)[0]


def _ring_fwd(q_BTNH, k_BSKH, v_BSKH, q_index_T, k_index_S, q_seg_BT, k_seg_BS, axis, degree,
              n_chunks, sliding_window):
  out_BTNH, lse_BKGT = _ring_forward(q_BTNH, k_BSKH, v_BSKH, q_index_T, k_index_S, q_seg_BT,
                                     k_seg_BS, axis, degree, n_chunks, sliding_window)
  return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, q_index_T, k_index_S, q_seg_BT, k_seg_BS, out_BTNH,
                    lse_BKGT)


def _ring_bwd(axis, degree, n_chunks, sliding_window, res, dout_BTNH):
  q_BTNH, k_BSKH, v_BSKH, q_index_T, k_index_S, q_seg_BT, k_seg_BS, out_BTNH, lse_BKGT = res
  dout_BTNH, q_index_T, k_index_S, q_seg_BT, k_seg_BS = _tie(dout_BTNH, q_index_T, k_index_S,
                                                             q_seg_BT, k_seg_BS)
  kv_heads = k_BSKH.shape[2]
  q_BTKGH = _grouped(q_BTNH, kv_heads)
  do_BTKGH = _grouped(dout_BTNH, kv_heads).astype(jnp.float32)
  delta_BKGT = jnp.einsum("btkgh,btkgh->bkgt", do_BTKGH,
                          _grouped(out_BTNH, kv_heads).astype(jnp.float32))
  q_chunks, do_chunks = _chunks(q_BTKGH, n_chunks), _chunks(do_BTKGH, n_chunks)
  lse_chunks, delta_chunks = _chunks(lse_BKGT, n_chunks, 3), _chunks(delta_BKGT, n_chunks, 3)
  qi_chunks, qs_chunks = _chunks(q_index_T, n_chunks, 0), _chunks(q_seg_BT, n_chunks)
  dq_chunks = tuple(jnp.zeros(q.shape, jnp.float32) for q in q_chunks)

  # As `_ring`, but dK and dV belong to the block: they go round with it, and once more at the
  # end, home.
  def step(carry, block):
    dq_chunks, dk, dv = list(carry[0]), carry[1], carry[2]
    k_c, v_c, ki_c, ks_c = (_chunks(block[0], n_chunks), _chunks(block[1], n_chunks),
                            _chunks(block[2], n_chunks, 0), _chunks(block[3], n_chunks))
    dk_c, dv_c = _chunks(dk, n_chunks), _chunks(dv, n_chunks)
    for a in range(n_chunks):
      for c in range(n_chunks):
        mask = block_mask_B11TS(qi_chunks[a], ki_c[c], qs_chunks[a], ks_c[c], sliding_window)

        def add(acc, a=a, c=c, mask=mask):
          dq, dk, dv = block_grads(q_chunks[a], k_c[c], v_c[c], do_chunks[a], lse_chunks[a],
                                   delta_chunks[a], mask)
          return acc[0] + dq, acc[1] + dk, acc[2] + dv

        dq_chunks[a], dk_c[c], dv_c[c] = jax.lax.cond(
            _pair_visible(qi_chunks[a], ki_c[c], sliding_window), add, lambda acc: acc,
            (dq_chunks[a], dk_c[c], dv_c[c]))
    return tuple(dq_chunks), jnp.concatenate(dk_c, axis=1), jnp.concatenate(dv_c, axis=1)

  def step_with_grads(carry, block):  # dK/dV ride in the block between steps
    dq_chunks, dk, dv = step((carry, block[4], block[5]), block)
    return dq_chunks, (dk, dv)

  block = (k_BSKH, v_BSKH, k_index_S, k_seg_BS, jnp.zeros(k_BSKH.shape, jnp.float32),
           jnp.zeros(v_BSKH.shape, jnp.float32))
  perm = [(j, (j + 1) % degree) for j in range(degree)]

  def body(_, cb):
    dq_chunks, block = cb
    dq_chunks, (dk, dv) = step_with_grads(dq_chunks, block)
    return dq_chunks, jax.lax.ppermute((*block[:4], dk, dv), axis, perm)

  dq_chunks, block = jax.lax.fori_loop(0, degree - 1, body, (dq_chunks, block))
  dq_chunks, (dk, dv) = step_with_grads(dq_chunks, block)
  dk, dv = jax.lax.ppermute((dk, dv), axis, perm)  # after `degree` hops they are home
  dq_BTNH = jnp.concatenate(dq_chunks, axis=1).reshape(q_BTNH.shape)
  return (dq_BTNH.astype(q_BTNH.dtype), dk.astype(k_BSKH.dtype), dv.astype(v_BSKH.dtype),
          None, None, None, None)


ring_attention_local.defvjp(_ring_fwd, _ring_bwd)


def all_gather_attention_local(q_BTNH, k_BSKH, v_BSKH, q_index_T, k_index_S, q_seg_BT, k_seg_BS,
                               axis, sliding_window=None):
  """Causal attention of this shard's queries over the whole sequence, its K/V (with their
  token indices and segment ids) all-gathered over `axis` (run inside shard_map).
  Shapes as ring_attention_local's; returns [B, T/C, N, Hv] in q's dtype."""
  q_BTNH, q_index_T, k_index_S, q_seg_BT, k_seg_BS = _tie(q_BTNH, q_index_T, k_index_S, q_seg_BT,
                                                          k_seg_BS)
  gather = functools.partial(jax.lax.all_gather, axis_name=axis, tiled=True)
  k_all, v_all, ks_all = gather(k_BSKH, axis=1), gather(v_BSKH, axis=1), gather(k_seg_BS, axis=1)
  ki_all = gather(k_index_S, axis=0)
  mask_B1TS = block_mask_B11TS(q_index_T, ki_all, q_seg_BT, ks_all, sliding_window)[:, 0]
  return attn_lib.xla_attention(q_BTNH, k_all, v_all, mask_B1TS)


# ---------------------------------------------------------------------- shard_map


def attention(q_BTNH, k_BTKH, v_BTKH, index_T, segment_ids_BT=None, *, impl="all_gather",
              load_balance=True, sliding_window=None):
  """Causal self-attention of a sequence sharded over the context axis (under jax.set_mesh +
  nn.logical_axis_rules, with `degree_in_context` > 1).

  q: [B, T, N, H], k/v: [B, T, K, H|Hv] in the layout `layout` gives (slot order), index_T
  [T] the original token index of each slot (causality follows it), segment_ids_BT [B, T] or
  None. Returns [B, T, N, Hv] in q's dtype, in the same slot order.
  """
  if impl not in IMPLS:
    raise ValueError(f"context_parallel_impl={impl!r} is not one of {', '.join(IMPLS)}")
  mesh = jax.sharding.get_abstract_mesh()
  degree = mesh.shape[sharding.CONTEXT_AXIS]
  q_spec = sharding.context_spec(("batch", "length", "heads", "head_dim"), q_BTNH.shape)
  kv_spec = sharding.context_spec(("batch", "length", "kv_heads", "head_dim"), k_BTKH.shape)
  if q_spec[1] != sharding.CONTEXT_AXIS:
    raise ValueError(f"context_parallel.attention: q {q_BTNH.shape} is not split over the "
                     f"context axis by the mesh and rules in context ({q_spec})")
  if kv_spec[2] != q_spec[2]:
    # The kv heads do not split over tensor as the query heads do: give each query head its own
    # copy so every shard holds the kv heads of its query heads (as the Pallas path does).
    n, k = q_BTNH.shape[2], k_BTKH.shape[2]
    k_BTKH, v_BTKH = (jnp.repeat(x, n // k, axis=2) for x in (k_BTKH, v_BTKH))
    kv_spec = q_spec
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros(q_BTNH.shape[:2], jnp.int32)
  index_T = jnp.asarray(index_T, jnp.int32)
  if impl == "ring":
    n_chunks = 2 if load_balance else 1

    def local(*args):  # custom_vjp takes its static arguments positionally
      return ring_attention_local(*args, sharding.CONTEXT_AXIS, degree, n_chunks, sliding_window)
  else:
    local = functools.partial(all_gather_attention_local, axis=sharding.CONTEXT_AXIS,
                              sliding_window=sliding_window)
  index_spec, row_spec = P(q_spec[1]), P(q_spec[0], q_spec[1])
  return jax.shard_map(
      local, in_specs=(q_spec, kv_spec, kv_spec, index_spec, index_spec, row_spec, row_spec),
      out_specs=q_spec, check_vma=False)(
          q_BTNH, k_BTKH, v_BTKH, index_T, index_T, segment_ids_BT.astype(jnp.int32),
          segment_ids_BT.astype(jnp.int32))
