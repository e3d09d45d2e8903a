"""Quantized weights with qwix post-training quantization: int8 per channel, int4 / nf4 in groups.

Owns which kernels are quantized and how (`rules`, `check`), the quantized model (`wrap`, used by
model.build), turning trained params into codes and scales (`quantize_params`, scanned layers
included), `dequantize`, their form on disk (`for_storage`) and what they occupy (`param_bytes`).

Used at load time (loader.py): by --mode=eval and --mode=sample on any checkpoint, as the frozen
base of LoRA (QLoRA), and by --mode=export to write a checkpoint of quantized weights. Quantized
weights are never trained.

- load_in_8bit: int8 codes with one float scale per output channel (absmax / 127).
- load_in_4bit: 4-bit codes with one scale per `quant_group_size` weights along the contracted
  axis that qwix tiles (the last one of each einsum: d_model for q/k/v and the MLP input, d_ff for
  the MLP output, head_dim for the attention output, which is one group when shorter than the
  group size). `quant_type` nf4 (QLoRA's 16 normal-float levels) or int4 (uniform, -7..7).
- The projection kernels are quantized; the embedding table and the output head are kept in the
  compute dtype, unless quantize_embeddings, which quantizes an untied output head as well (a
  tied head is the embedding table, read by a lookup, which qwix does not quantize).

qwix swaps in its own einsum while the model runs; its rules match module paths. Scales are
float32. `jax.Array.nbytes` counts a 4-bit code as a byte, so `param_bytes` counts bits.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax import traverse_util
from qwix._src.providers.ptq import WithAux  # the quantized leaf; qwix does not re-export it

from llm_jax import errors

QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
# Module paths of the projections (blocks_<i>/... unrolled, layers/... scanned), by tiled axis.
_INPUT_SIDE = r".*/(attn/(query|key|value)|mlp/(wi_gate|wi_up|wi))"
_OUT = r".*/attn/out"
_WO = r".*/mlp/wo"
_HEAD = "lm_head"


def is_quantized(leaf) -> bool:
  return isinstance(leaf, WithAux)


def _groups(cfg) -> list[tuple[str, str, int]]:
  """(module path regex, what its tiled axis is, that axis's length) for each 4-bit rule."""
  groups = [(_INPUT_SIDE, "d_model (the input of q/k/v and the MLP)", cfg.d_model),
            (_OUT, "d_v (the attention output's head_dim)", cfg.d_v),
            (_WO, "d_ff (the input of mlp/wo)", cfg.d_ff)]
  if cfg.quantize_embeddings and not cfg.tie_embeddings:
    groups.append((_HEAD, "d_model (the input of lm_head)", cfg.d_model))
  return groups


def check(cfg) -> None:
  """Raises UserError (exit 2), naming the field, when a ModelConfig cannot be quantized so."""
  if cfg.quant not in QTYPES:
    raise errors.UserError(f"quant_type={cfg.quant!r} is not one of {', '.join(QTYPES)}")
  if cfg.quantize_embeddings and cfg.tie_embeddings:
    raise errors.UserError("quantize_embeddings=True, but this model ties its output head to the "
                           "embedding table, which is read by a lookup that qwix does not "
                           "quantize: set quantize_embeddings=False")
  if cfg.quant == "int8":
    return
  g = cfg.quant_group_size
  for _, what, n in _groups(cfg):
    if n > g and n % g:
      divisors = [d for d in range(8, n) if n % d == 0 and d <= 256]
      raise errors.UserError(f"quant_group_size={g} does not divide {what} = {n}: use a divisor "
                             f"of {n}" + (f" such as {divisors[-1]}" if divisors else ""))


def rules(cfg) -> list:
  """qwix rules for a ModelConfig: which module paths are quantized, to what, in which groups."""
  qtype = QTYPES[cfg.quant]
  if cfg.quant == "int8":  # per channel: no tiles
    paths = [_INPUT_SIDE, _OUT, _WO] + ([_HEAD] if cfg.quantize_embeddings else [])
    return [qwix.QuantizationRule(module_path="|".join(paths), weight_qtype=qtype)]
  return [qwix.QuantizationRule(module_path=path, weight_qtype=qtype,
                                tile_size=min(cfg.quant_group_size, n))
          for path, _, n in _groups(cfg)]


def wrap(model: nn.Module, cfg) -> nn.Module:
  """`model` running its quantized kernels through qwix (params from `quantize_params`)."""
  check(cfg)
  return qwix.quantize_model(model, qwix.PtqProvider(rules(cfg)))


def quantize_params(params, abstract, scanned: bool, compute_dtype):
  """Trained params -> the quantized model's params (`abstract`: its unboxed eval_shape tree).

  Leaves that `abstract` holds as quantized become codes + scales; other matrices (embeddings,
  the output head) are cast to `compute_dtype`; norms and biases are kept. With scanned layers
  qwix's own quantize_params applies one layer's recipe to the stacked [L, ...] kernel (wrong
  scale shapes), so the recipe is vmapped over the layer axis here.
  """
  flat_abs = traverse_util.flatten_dict(abstract, is_leaf=lambda _, v: is_quantized(v))
  out = {}
  for path, w in traverse_util.flatten_dict(params).items():
    a = flat_abs[path]
    if is_quantized(a):
      how = a.how
      q = functools.partial(qwix.quantize, qtype=how.qtype, channelwise_axes=how.channelwise_axes,
                            tiled_axes=how.tiled_axes,
                            calibration_method=how.calibration_method)
      w = a.replace(array=jax.vmap(q)(w) if scanned and path[0] == "layers" else q(w))
    elif w.ndim >= 2 and jnp.issubdtype(w.dtype, jnp.floating):
      w = w.astype(compute_dtype)
    out[path] = w
  return traverse_util.unflatten_dict(out)


def dequantize(leaf):
  """A quantized leaf's weights in its scales' dtype (other leaves unchanged)."""
  return qwix.dequantize(leaf.array) if is_quantized(leaf) else leaf


def _uint4_as_uint8(x):
  if jnp.dtype(x.dtype) != jnp.uint4:
    return x
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, jnp.uint8, sharding=x.sharding)
  return x.astype(jnp.uint8)


def for_storage(tree):
  """Params (or their abstract target) as orbax can write them: nf4's uint4 codes as uint8
  (tensorstore has no uint4; int8 and int4 are stored as they are)."""
  return jax.tree.map(_uint4_as_uint8, tree)


def from_storage(tree, target):
  """`for_storage`'s inverse, given the abstract target it was made from."""
  return jax.tree.map(lambda x, t: x.astype(jnp.uint4) if jnp.dtype(t.dtype) == jnp.uint4 else x,
                      tree, target)


def param_bytes(tree) -> int:
  """Bytes the arrays of `tree` hold at their real width (a 4-bit code is half a byte)."""
  bits = 0
  for x in jax.tree.leaves(tree):
    dtype = jnp.dtype(x.dtype)
    if jnp.issubdtype(dtype, jnp.integer):
      width = jnp.iinfo(dtype).bits
    else:
      width = jnp.finfo(dtype).bits if jnp.issubdtype(dtype, jnp.floating) else 8 * dtype.itemsize
    bits += x.size * width
  return bits // 8
