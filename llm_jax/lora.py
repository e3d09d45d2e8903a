"""LoRA: low-rank adapters on the model's projections, y = W x + (alpha / r) B A dropout(x).

Owns the adapter module, the interceptor that attaches it to the model (`wrap`, used by
model.build), the split of a param tree into the frozen base and the adapters and back
(`split`, `combine`), and `merge`, which folds the adapters into the kernels.

An `nn.intercept_methods` interceptor runs after every `nn.Einsum` named by `lora_targets`
(q -> attn/query, k, v, o -> attn/out, wi, gate -> mlp/wi_gate, up -> mlp/wi_up, wo) and adds a
child module `lora` with params `a` [contracted dims..., r] and `b` [r, output dims...], so the
model code is untouched and unrolled, scanned and rematerialized layers all work. The adapters
take the kernel's logical axes, so they shard like it. `a` has PEFT's init (kaiming uniform),
`b` zeros: before training, a LoRA model computes exactly its base's function. Dropout on the
adapter's input runs only when the enclosing layer is not deterministic, i.e. in training: never
at evaluation or sampling.

Trainable embeddings and head (PEFT's `modules_to_save` and `trainable_token_indices`): with
`lora_train_embeddings` the whole embedding table (and an untied head) trains beside the
adapters; with `lora_trainable_tokens` only some token ids' rows of the table (and their columns
of an untied head). Either is a `delta` param beside the adapters, under `embed/lora` and
`lm_head/lora` ([V, D] / [D, V], or [n, D] / [D, n] for n token ids), zero at the start; the model
applies table + delta (`fold`, inside `apply`, so every caller of build(cfg) sees it). So they are
adapters like the others for everything downstream: split and combine, shardings (a whole delta
takes the table's logical axes, rows keep its embed axis), checkpoints (rows alone: n * D
numbers), optimizer state (only the delta's), merge. Frozen rows get no gradient at all. Under
AdamW without weight decay (configs/finetune.py) the update of a delta is exactly the update
training those rows would get (Adam sees only gradients); with weight decay (the embedding's
deltas under decay_embeddings, the head's always, as optimizer.decay_mask decides by path) it
pulls the rows toward their starting values, as it pulls the adapters toward zero.

Why not qwix's own LoRA (qwix.LoraProvider, 0.1.8): on Flax linen's nn.Einsum it crashes at init
(SetAttributeFrozenModuleError, from a debug setattr on the frozen module), and once patched its
dropout stays on at evaluation and sampling. Why a child module rather than params beside the
kernel: qwix's quantization (quantize.py, QLoRA) matches module paths and quantizes the params
of the module it intercepts, so adapters beside a quantized kernel would be quantized too (qwix
fails trying to tile them); under their own path they stay in full precision.
"""

import string

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from llm_jax import errors

TARGETS = {"q": "attn/query", "k": "attn/key", "v": "attn/value", "o": "attn/out",
           "wi": "mlp/wi", "gate": "mlp/wi_gate", "up": "mlp/wi_up", "wo": "mlp/wo"}
_SWIGLU_ONLY, _NOT_SWIGLU = ("gate", "up"), ("wi",)
ADAPTER = "lora"  # the adapters' module name: every adapter param path contains it
DELTA = "delta"  # a trainable embedding's / head's param under <module>/lora (see the docstring)
# (module, param, which axis is the vocabulary) of the tables a delta can train.
_TABLES = (("embed", "embedding", 0), ("lm_head", "kernel", 1))


def target_paths(targets: str, activation: str | None) -> frozenset:
  """`lora_targets` ("q,v", "all", ...) -> module paths ("attn/query", ...); ValueError if bad.

  activation None checks the names alone (the model's MLP may not be known yet).
  """
  names = [t.strip() for t in targets.split(",") if t.strip()]
  swiglu = activation == "swiglu"
  if names == ["all"]:
    names = [n for n in TARGETS if n not in (_NOT_SWIGLU if swiglu else _SWIGLU_ONLY)]
  unknown = [n for n in names if n not in TARGETS]
  if unknown or not names:
    raise errors.UserError(f"lora_targets={targets!r}: {', '.join(unknown) or 'nothing'} is not a "
                           f"projection; name any of {','.join(TARGETS)}, or all")
  if activation is None:
    return frozenset()
  absent = [n for n in names if n in (_NOT_SWIGLU if swiglu else _SWIGLU_ONLY)]
  if absent:
    have = "gate,up (swiglu's two input projections)" if swiglu else "wi"
    raise errors.UserError(f"lora_targets={targets!r}: this model (activation={activation}) has no "
                           f"{','.join(absent)}; its MLP input is {have}")
  return frozenset(TARGETS[n] for n in names)


def token_ids(cfg) -> tuple[int, ...]:
  """A ModelConfig's (or config's) lora_trainable_tokens as ids: "" -> (), "5,17" -> (5, 17).

  Token strings are resolved to ids before a run starts (`resolve_tokens`); only ids reach here.
  """
  spec = cfg.lora_trainable_tokens or ""
  return tuple(int(t) for t in spec.split(",") if t.strip())


def trains_tables(cfg) -> bool:
  """Whether a LoRA ModelConfig trains embedding / head rows (a `delta` beside the adapters)."""
  return bool(cfg.lora_r and (cfg.lora_train_embeddings or cfg.lora_trainable_tokens))


def resolve_tokens(spec: str, tokenizer, vocab_size: int) -> str:
  """lora_trainable_tokens as the user wrote it (ids and token strings, comma-separated) -> the
  ids it names, comma-separated, in the order given, each once. A string is a piece of the
  vocabulary or text that encodes as one token. UserError for one that is neither (saying what it
  splits into) and for an id outside the vocabulary.
  """
  from llm_jax import errors  # pylint: disable=g-import-not-at-top
  ids, bad = [], []
  for item in (t.strip() for t in (spec or "").split(",")):
    if not item:
      continue
    if item.lstrip("-").isdigit():
      i = int(item)
      if not 0 <= i < vocab_size:
        bad.append(f"id {i} is outside the vocabulary (0..{vocab_size - 1})")
        continue
    else:
      i = tokenizer.piece_to_id(item)  # a piece as the vocabulary spells it ('▁the', '<|x|>')
      if i is None or tokenizer.id_to_piece(i) != item:  # sentencepiece answers unk for others
        pieces = tokenizer.encode(item)  # else text that is one token ('the' -> '▁the')
        if len(pieces) != 1:
          bad.append(f"{item!r} is not one token of this tokenizer (it encodes as "
                     f"{len(pieces)} tokens {pieces}); name a single token, or its id")
          continue
        i = pieces[0]
    if i not in ids:
      ids.append(i)
  if bad:
    raise errors.UserError("lora_trainable_tokens=" + repr(spec) + ": " + "; ".join(bad))
  return ",".join(map(str, ids))


def scale(cfg) -> float:
  """alpha / r of a ModelConfig."""
  return cfg.lora_alpha / cfg.lora_r


def _parse(einsum_str: str):
  """'btd,dnh->btnh' -> (lhs, rhs, out, contracted, kept, batch, a fresh letter for the rank)."""
  spec = einsum_str.replace(" ", "")
  lhs, rest = spec.split(",")
  rhs, out = rest.split("->")
  con = "".join(c for c in rhs if c in lhs)
  keep = "".join(c for c in rhs if c not in lhs)
  bat = "".join(c for c in lhs if c not in con)
  if rhs != con + keep:  # merge relies on it: kernel == contracted axes, then output axes
    raise ValueError(f"LoRA needs the kernel's contracted axes first, got {einsum_str!r}")
  return lhs, rhs, out, con, keep, bat, next(c for c in string.ascii_letters if c not in spec)


class Adapter(nn.Module):
  """(alpha / r) * B(A(dropout(x))) for one nn.Einsum kernel of `kernel_shape` and `kernel_axes`."""
  einsum_str: str
  kernel_shape: tuple
  kernel_axes: tuple
  rank: int
  scale: float
  dropout: float
  deterministic: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    lhs, rhs, out, con, keep, bat, r = _parse(self.einsum_str)
    dims, axes = dict(zip(rhs, self.kernel_shape)), dict(zip(rhs, self.kernel_axes))
    # PEFT's kaiming_uniform(a=sqrt(5)) over the contracted (fan-in) axes.
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                              in_axis=tuple(range(len(con))), out_axis=-1)
    a = self.param("a", nn.with_logical_partitioning(a_init, tuple(axes[c] for c in con) + (None,)),
                   tuple(dims[c] for c in con) + (self.rank,), self.param_dtype)
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                     (None,) + tuple(axes[c] for c in keep)),
                   (self.rank,) + tuple(dims[c] for c in keep), self.param_dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=self.deterministic)
    h = jnp.einsum(f"{lhs},{con}{r}->{bat}{r}", x.astype(self.dtype), a.astype(self.dtype))
    return jnp.einsum(f"{bat}{r},{r}{keep}->{out}", h, b.astype(self.dtype)) * self.scale


def _interceptor(cfg):
  paths = target_paths(cfg.lora_targets, cfg.activation)

  def intercept(next_fun, args, kwargs, ctx):
    y = next_fun(*args, **kwargs)
    m = ctx.module
    if (ctx.method_name != "__call__" or not isinstance(m, nn.Einsum)
        or "/".join(m.path[-2:]) not in paths):
      return y
    # Logical axis names of the kernel (its init is tagged with them): traced, nothing allocated.
    kernel_axes = jax.eval_shape(lambda k: m.kernel_init(k, m.shape, m.param_dtype),
                                 jax.random.key(0)).names
    dtype = m.dtype or args[0].dtype
    adapter = Adapter(m.einsum_str, tuple(m.shape), tuple(kernel_axes), cfg.lora_r, scale(cfg),
                      cfg.lora_dropout, getattr(m.parent, "deterministic", True), dtype,
                      m.param_dtype, parent=m, name=ADAPTER)
    return y + adapter(args[0]).astype(y.dtype)

  return nn.intercept_methods(intercept)


def _deltas(cfg):
  """{(module,): (shape, logical axes)} of the trainable-table deltas a ModelConfig asks for."""
  if not trains_tables(cfg):
    return {}
  ids, v, d = token_ids(cfg), cfg.padded_vocab, cfg.d_model
  n, vocab_axis = (len(ids), None) if ids else (v, "vocab")
  out = {"embed": ((n, d), (vocab_axis, "embed"))}
  if not cfg.tie_embeddings:
    out["lm_head"] = ((d, n), ("embed", vocab_axis))
  return out


def fold(params, cfg):
  """params with each table's delta added in (rows scattered to their ids) and the deltas
  removed: what the model applies. Params without deltas are returned as they are."""
  flat = _flat(params)
  if not any(p[-2:] == (ADAPTER, DELTA) for p in flat):
    return params
  ids = jnp.asarray(token_ids(cfg), jnp.int32) if cfg.lora_trainable_tokens else None
  for module, name, vocab_axis in _TABLES:
    delta = flat.pop((module, ADAPTER, DELTA), None)
    if delta is None:
      continue
    w = flat[(module, name)]
    dtype = jnp.promote_types(w.dtype, delta.dtype)
    w, delta = w.astype(dtype), delta.astype(dtype)
    if ids is None:
      flat[(module, name)] = w + delta
    elif vocab_axis == 0:
      flat[(module, name)] = w.at[ids].add(delta)
    else:
      flat[(module, name)] = w.at[:, ids].add(delta)
  return traverse_util.unflatten_dict(flat)


def split_deltas(params):
  """(params without the tables' deltas, the deltas): for counting what multiplies."""
  flat = _flat(params)
  deltas = {p: v for p, v in flat.items() if p[-1] == DELTA and is_adapter(p)}
  rest = {p: v for p, v in flat.items() if p not in deltas}
  return traverse_util.unflatten_dict(rest), traverse_util.unflatten_dict(deltas)


def tables_note(cfg) -> str:
  """' + the embedding and head' / ' + 3 token rows' when a LoRA ModelConfig trains tables."""
  if not trains_tables(cfg):
    return ""
  what = "embedding" if cfg.tie_embeddings else "embedding and head"
  if cfg.lora_train_embeddings:
    return f" + the whole {what}"
  return f" + {len(token_ids(cfg))} token rows of the {what}"


class _WithAdapters:
  """A model whose init and apply run with the adapters attached (see the module docstring)."""

  def __init__(self, model, cfg):
    self.model, self.cfg = model, cfg

  def init(self, *args, **kwargs):
    with _interceptor(self.cfg):
      variables = self.model.init(*args, **kwargs)
    deltas = _deltas(self.cfg)
    if not deltas:
      return variables
    params = dict(variables["params"])
    for module, (shape, axes) in deltas.items():
      zeros = jnp.zeros(shape, self.cfg.param_dtype)
      params[module] = {**params[module], ADAPTER: {DELTA: nn.LogicallyPartitioned(zeros, axes)}}
    return {**variables, "params": params}

  def apply(self, variables, *args, **kwargs):
    variables = {**variables, "params": fold(variables["params"], self.cfg)}
    with _interceptor(self.cfg):
      return self.model.apply(variables, *args, **kwargs)


def wrap(model, cfg):
  """`model` (a Transformer, quantized or not) with adapters as `cfg` (a ModelConfig) asks."""
  target_paths(cfg.lora_targets, cfg.activation)
  return _WithAdapters(model, cfg)


def is_adapter(path) -> bool:
  """Whether a param path (a tuple of names, or a jax key path) is an adapter's."""
  return any(getattr(k, "key", k) == ADAPTER for k in path)


def _flat(tree):
  return traverse_util.flatten_dict(tree) if tree else {}


def split(params):
  """(frozen base, adapters): two nested dicts that `combine` joins back."""
  flat = _flat(params)
  base = {p: v for p, v in flat.items() if not is_adapter(p)}
  adapters = {p: v for p, v in flat.items() if is_adapter(p)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def combine(base, adapters):
  """The model's whole param tree from `split`'s two parts (`base` may be empty: no LoRA)."""
  if not base:
    return adapters
  return traverse_util.unflatten_dict({**_flat(base), **_flat(adapters)})


def merge(params, cfg):
  """Plain params in param_dtype computing what base + adapters compute: W + (alpha / r) A B,
  and each trained table with its delta folded in.

  Quantized kernels (QLoRA) are dequantized first, since the adapters were trained against the
  quantized base; the result is full precision, without adapters.
  """
  from llm_jax import quantize  # pylint: disable=g-import-not-at-top
  flat = _flat(fold(params, cfg))
  out = {}
  for path, w in flat.items():
    if is_adapter(path):
      continue
    w = quantize.dequantize(w)
    a, b = flat.get(path[:-1] + (ADAPTER, "a")), flat.get(path[:-1] + (ADAPTER, "b"))
    if path[-1] == "kernel" and a is not None:
      def delta(a, b):  # [con..., r] x [r, keep...] -> the kernel's [con..., keep...]
        return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
      scanned = a.ndim + b.ndim - 2 != w.ndim  # a leading layer axis on all three
      w = w.astype(jnp.float32) + scale(cfg) * (jax.vmap(delta) if scanned else delta)(a, b)
    if jnp.issubdtype(w.dtype, jnp.floating):
      w = w.astype(cfg.param_dtype)
    out[path] = w
  return traverse_util.unflatten_dict(out)
