"""Hugging Face checkpoints: import GPT-2 and Llama-family (Llama, Mistral, Qwen2) models from a
local directory into an llm_jax workdir, and export llm_jax models back to that format.

Import (`--mode=import --config.hf_path=DIR --workdir=W`): config.json is mapped onto the model
fields (anything that cannot be mapped is refused, naming the field and value, before any weight
is read); every safetensors file is opened and every tensor's name and shape checked against the
mapping; then the weights are read tensor by tensor (safetensors, numpy: no torch) and each param
is placed straight into its sharding under the configured mesh, so no device ever holds the whole
model. The result is an ordinary checkpoint at step 0 (params, config, tokenizer, meta; no
optimizer state), written only once everything has been read.

Export (`--mode=export --config.hf_export_dir=OUT`): config.json, generation_config.json,
model.safetensors (sharded past `max_shard_bytes`) and the tokenizer files, which transformers'
AutoModelForCausalLM / AutoTokenizer load. A model neither family can express is refused, naming
the fields and the nearest family.

The weight mapping (one table serves both directions): torch `Linear` weights are [out, in], so
Llama's are transposed; GPT-2's Conv1D weights are already [in, out] and its fused c_attn splits
into query/key/value. llm_jax's RoPE is the rotate-half form HF Llama uses, so q/k load unpermuted.
The embedding (and an untied head) is padded with zero rows up to a multiple of vocab_multiple.
"""

import dataclasses
import json
import logging
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import files
from llm_jax import hf_tokenizer
from llm_jax import model as model_lib
from llm_jax import sharding as sharding_lib

FAMILIES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
# The model fields an import sets from config.json (the command line may not override them).
ARCH_FIELDS = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff", "d_k", "d_v",
               "max_position_embeddings", "position_embedding", "rope_theta", "rope_scaling",
               *config_lib.ROPE_PARAM_FIELDS, "sliding_window", "activation", "use_rms_norm",
               "layer_norm_eps", "use_bias", "qkv_bias", "tie_embeddings")
# transformers' rope_parameters keys -> the config fields (config.ROPE_PARAMS says which type
# reads which); "rope_type" / "type", "rope_theta" and "partial_rotary_factor" are read apart.
HF_ROPE_KEYS = {"factor": "rope_scaling_factor",
                "original_max_position_embeddings": "rope_original_max_len",
                "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor", "beta_fast": "rope_beta_fast",
                "beta_slow": "rope_beta_slow", "attention_factor": "rope_attention_factor",
                "mscale": "rope_mscale", "mscale_all_dim": "rope_mscale_all_dim",
                "truncate": "rope_truncate"}
_GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
                     "gelu": "gelu_exact", "relu": "relu"}
# Buffers some checkpoints carry that are not weights (GPT-2's causal mask, old rotary tables).
_IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$")
DEFAULT_BLOCK_SIZE = 1024


class HFError(errors.UserError):
  """The Hugging Face directory (or the model to export) cannot be used; says why and what to do."""


def _problems(problems, what):
  if problems:
    raise HFError(f"{what}:\n" + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------------------ config.json


def read_config(hf_path: str) -> dict:
  path = os.path.join(hf_path, "config.json")
  if not os.path.isdir(hf_path):
    raise HFError(f"hf_path={hf_path!r} is not a directory: point it at a local Hugging Face "
                  f"model directory (config.json, *.safetensors, tokenizer files)")
  if not os.path.exists(path):
    raise HFError(f"hf_path={hf_path!r} has no config.json: it is not a Hugging Face model "
                  f"directory (download the whole model, e.g. with huggingface-cli download)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise HFError(f"{path} is not valid JSON ({e})") from None


def _rope_fields(hf: dict, problems: list) -> dict:
  """RoPE theta and scaling from transformers 5's rope_parameters or 4's rope_theta/rope_scaling,
  as transformers reads them (modeling_rope_utils.py: its defaults for an absent
  original_max_position_embeddings or YaRN factor; dynamic NTK's original length is
  max_position_embeddings)."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  out = {"rope_theta": float(theta), "rope_scaling": "none",
         **{f: None for f in config_lib.ROPE_PARAM_FIELDS}}
  partial = hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    problems.append(f"partial_rotary_factor={partial}: llm_jax rotates the whole head dimension")
  if kind == "default":
    return out
  if kind not in config_lib.ROPE_PARAMS:
    problems.append(f"rope_type={kind!r}: llm_jax has RoPE scaling default, "
                    f"{', '.join(k for k in config_lib.ROPE_SCALINGS if k != 'none')} only")
    return out
  unknown = sorted(set(params) - set(HF_ROPE_KEYS) - {"rope_type", "type", "rope_theta",
                                                      "partial_rotary_factor"})
  if unknown:
    problems.append(f"rope_scaling key(s) {', '.join(map(repr, unknown))} (rope_type={kind!r}) "
                    f"are no RoPE parameter transformers defines: remove them from config.json")
  positions = hf.get("max_position_embeddings", 2048)
  if kind in ("yarn", "llama3"):  # transformers' standardize_rope_params
    params.setdefault("original_max_position_embeddings",
                      hf.get("original_max_position_embeddings", positions))
  if kind == "dynamic":
    params["original_max_position_embeddings"] = positions
  if kind == "yarn" and params.get("factor") is None:
    params["factor"] = positions / params["original_max_position_embeddings"]
  reads = config_lib.rope_params(kind)
  required = config_lib.ROPE_PARAMS[kind][0]
  out["rope_scaling"] = kind
  for key, field in HF_ROPE_KEYS.items():
    value = params.get(key)
    if field not in reads:
      if value is not None:
        logging.warning("config.json: rope_scaling key %r does nothing with rope_type=%r "
                        "(transformers ignores it too)", key, kind)
      continue
    if value is None and field in required:
      problems.append(f"rope_scaling (rope_type={kind!r}) has no {key!r}, which "
                      f"transformers requires: add it to config.json")
    out[field] = None if value is None else (
        bool(value) if field == "rope_truncate" else
        int(value) if field == "rope_original_max_len" else float(value))
  return out


def _sliding_window(hf: dict, mt: str, n_layers: int, context: int, problems: list):
  """The sliding window of a Mistral / Qwen2 config.json (None: full causal within `context`)."""
  window = hf.get("sliding_window")
  types = hf.get("layer_types")
  if mt == "qwen2" and types is None:
    on = hf.get("use_sliding_window", False) and window is not None
    types = ["sliding_attention" if on and i >= hf.get("max_window_layers", n_layers)
             else "full_attention" for i in range(n_layers)]
  elif mt == "mistral" and types is None:
    types = ["sliding_attention" if window is not None else "full_attention"] * n_layers
  if not types or window is None or set(types) == {"full_attention"}:
    return None
  if set(types) != {"sliding_attention"}:
    sliding = types.count("sliding_attention")
    problems.append(f"layer_types mixes sliding and full attention ({sliding} of {len(types)} "
                    f"layers slide): llm_jax has one sliding_window for every layer")
    return None
  return window if window < context else None  # a window as long as the context does nothing


def model_fields(hf: dict, max_seq_len: int | None = None) -> dict:
  """llm_jax model fields (plus max_seq_len) for a config.json; HFError lists what cannot map.

  max_seq_len: the context to use (None = the model's max positions); a sliding window shorter
  than it is refused.
  """
  mt = hf.get("model_type")
  if mt not in FAMILIES:
    raise HFError(f"model_type={mt!r} in config.json is not supported: llm_jax imports "
                  f"{', '.join(FAMILIES)}")
  problems = []
  for key in ("use_parallel_residual", "parallel_attn", "add_cross_attention"):
    if hf.get(key):
      problems.append(f"{key}={hf[key]!r}: llm_jax blocks are sequential decoder-only blocks")
  if mt == "gpt2":
    d, n = hf.get("n_embd", 768), hf.get("n_head", 12)
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
      problems.append(f"activation_function={act!r}: llm_jax has {', '.join(_GPT2_ACTIVATIONS)}")
    if not hf.get("scale_attn_weights", True):
      problems.append("scale_attn_weights=False: llm_jax always scales scores by 1/sqrt(d_k)")
    if hf.get("scale_attn_by_inverse_layer_idx"):
      problems.append("scale_attn_by_inverse_layer_idx=True: llm_jax does not scale scores by "
                      "layer")
    if d % n:
      problems.append(f"n_embd={d} is not a multiple of n_head={n}")
    positions = hf.get("n_positions", 1024)
    fields = dict(d_model=d, n_heads=n, n_kv_heads=n, n_layers=hf.get("n_layer", 12),
                  d_ff=hf.get("n_inner") or 4 * d, d_k=d // n, d_v=d // n,
                  position_embedding="learned", rope_theta=10000.0, rope_scaling="none",
                  **{f: None for f in config_lib.ROPE_PARAM_FIELDS}, sliding_window=None,
                  activation=_GPT2_ACTIVATIONS.get(act, "gelu"),
                  use_rms_norm=False, layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  use_bias=True, qkv_bias=True,
                  tie_embeddings=hf.get("tie_word_embeddings", True))
  else:
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    h = hf.get("head_dim") or d // n
    if hf.get("hidden_act", "silu") != "silu":
      problems.append(f"hidden_act={hf['hidden_act']!r}: llm_jax's gated MLP is SwiGLU (silu)")
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if mt == "qwen2":
      use_bias, qkv_bias = False, True
    elif attn_bias != mlp_bias:
      problems.append(f"attention_bias={attn_bias} with mlp_bias={mlp_bias}: llm_jax has biases "
                      f"on every projection (use_bias) or on q/k/v only (qkv_bias)")
      use_bias = qkv_bias = attn_bias
    else:
      use_bias = qkv_bias = bool(attn_bias)
    positions = hf.get("max_position_embeddings", 2048)
    fields = dict(d_model=d, n_heads=n, n_kv_heads=hf.get("num_key_value_heads") or n,
                  n_layers=hf["num_hidden_layers"], d_ff=hf["intermediate_size"], d_k=h, d_v=h,
                  position_embedding="rope", activation="swiglu", use_rms_norm=True,
                  layer_norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=use_bias,
                  qkv_bias=qkv_bias, tie_embeddings=hf.get("tie_word_embeddings", False),
                  **_rope_fields(hf, problems))
    fields["sliding_window"] = _sliding_window(hf, mt, fields["n_layers"],
                                               max_seq_len or positions, problems)
  _problems(problems, f"config.json (model_type={mt!r}) cannot be mapped onto llm_jax's model")
  fields.update(vocab_size=hf["vocab_size"], max_position_embeddings=positions,
                max_seq_len=max_seq_len or positions)
  return fields


def import_config(raw_cfg, hf: dict, overrides: dict | None = None):
  """The finalized flat config of an import: `raw_cfg` (the --config file) with the model fields of
  config.json; the command line may set anything else (dtype, param_dtype, max_seq_len,
  block_size, the mesh, ...)."""
  overrides = dict(overrides or {})
  clash = sorted(f for f in ARCH_FIELDS if f in overrides)
  if clash:
    raise HFError(f"--config.{clash[0]} (and {len(clash)} field(s) in all: {', '.join(clash)}) "
                  f"comes from the model's config.json on import: drop it from the command line")
  fields = model_fields(hf, overrides.get("max_seq_len"))
  c = raw_cfg.copy_and_resolve_references()
  with c.unlocked():
    for k, v in fields.items():
      c[k] = v
    if "block_size" not in overrides:
      c.block_size = min(c.max_seq_len, DEFAULT_BLOCK_SIZE)
  try:
    return config_lib.finalize(c)
  except config_lib.ConfigError as e:
    raise HFError(f"the imported model's config is invalid: {e}") from None


# ----------------------------------------------------------------------- the weight mapping


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One HF tensor <-> one or more llm_jax params (unscanned names, e.g. blocks_0/attn/query)."""
  hf: str
  hf_shape: tuple
  ours: tuple  # of param paths (tuples of names)
  to_ours: Callable  # hf array -> tuple of our arrays
  to_hf: Callable  # our arrays -> hf array


def _pad_rows(v_pad):
  return lambda w: (np.pad(w, ((0, v_pad - w.shape[0]), (0, 0))),)


def _rules(mc: model_lib.ModelConfig, family: str, prefix: str) -> list:
  d, n, k, h, f, v = mc.d_model, mc.n_heads, mc.n_kv_heads, mc.d_k, mc.d_ff, mc.vocab_size
  vp = mc.padded_vocab
  ident = (lambda w: (w,)), (lambda w: w)
  rules = []

  def add(hf, shape, ours, fns=ident):
    rules.append(_Rule(prefix + hf, tuple(shape), tuple(tuple(o.split("/")) for o in ours), *fns))

  add("wte.weight" if family == "gpt2" else "embed_tokens.weight", (v, d), ["embed/embedding"],
      (_pad_rows(vp), lambda e: e[:v]))
  if family == "gpt2":
    add("wpe.weight", (mc.max_position_embeddings, d), ["pos_embed/embedding"])
  for i in range(mc.n_layers):
    b = f"blocks_{i}/"
    if family == "gpt2":
      p = f"h.{i}."
      for hf_norm, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        add(p + hf_norm + ".weight", (d,), [b + ours + "/scale"])
        add(p + hf_norm + ".bias", (d,), [b + ours + "/bias"])
      qkv = [b + f"attn/{x}/" for x in ("query", "key", "value")]
      add(p + "attn.c_attn.weight", (d, 3 * d), [x + "kernel" for x in qkv],
          (lambda w: tuple(w.reshape(d, 3, n, h)[:, j] for j in range(3)),
           lambda *ws: np.stack(ws, 1).reshape(d, 3 * d)))
      add(p + "attn.c_attn.bias", (3 * d,), [x + "bias" for x in qkv],
          (lambda w: tuple(w.reshape(3, n, h)), lambda *ws: np.stack(ws).reshape(3 * d)))
      add(p + "attn.c_proj.weight", (d, d), [b + "attn/out/kernel"],
          (lambda w: (w.reshape(n, h, d),), lambda w: w.reshape(d, d)))
      add(p + "attn.c_proj.bias", (d,), [b + "attn/out/bias"])
      add(p + "mlp.c_fc.weight", (d, f), [b + "mlp/wi/kernel"])
      add(p + "mlp.c_fc.bias", (f,), [b + "mlp/wi/bias"])
      add(p + "mlp.c_proj.weight", (f, d), [b + "mlp/wo/kernel"])
      add(p + "mlp.c_proj.bias", (d,), [b + "mlp/wo/bias"])
      continue
    p = f"layers.{i}."
    add(p + "input_layernorm.weight", (d,), [b + "attn_norm/scale"])
    add(p + "post_attention_layernorm.weight", (d,), [b + "mlp_norm/scale"])
    for name, heads in (("query", n), ("key", k), ("value", k)):
      hf = f"self_attn.{name[0]}_proj."
      add(p + hf + "weight", (heads * h, d), [b + f"attn/{name}/kernel"],
          (lambda w, heads=heads: (w.T.reshape(d, heads, h),),
           lambda w, heads=heads: w.reshape(d, heads * h).T))
      if mc.has_qkv_bias:
        add(p + hf + "bias", (heads * h,), [b + f"attn/{name}/bias"],
            (lambda w, heads=heads: (w.reshape(heads, h),), lambda w: w.reshape(-1)))
    add(p + "self_attn.o_proj.weight", (d, n * h), [b + "attn/out/kernel"],
        (lambda w: (w.T.reshape(n, h, d),), lambda w: w.reshape(n * h, d).T))
    mlp = (("gate_proj", "wi_gate", (f, d)), ("up_proj", "wi_up", (f, d)),
           ("down_proj", "wo", (d, f)))
    for hf, ours, shape in mlp:
      add(p + f"mlp.{hf}.weight", shape, [b + f"mlp/{ours}/kernel"],
          ((lambda w: (w.T,)), (lambda w: w.T)))
    if mc.use_bias:
      add(p + "self_attn.o_proj.bias", (d,), [b + "attn/out/bias"])
      for hf, ours, shape in mlp:
        add(p + f"mlp.{hf}.bias", shape[:1], [b + f"mlp/{ours}/bias"])
  add("ln_f.weight" if family == "gpt2" else "norm.weight", (d,), ["final_norm/scale"])
  if family == "gpt2":
    add("ln_f.bias", (d,), ["final_norm/bias"])
  if not mc.tie_embeddings:
    rules.append(_Rule("lm_head.weight", (v, d), (("lm_head", "kernel"),),
                       lambda w: (np.pad(w.T, ((0, 0), (0, vp - v))),), lambda w: w[:, :v].T))
  return rules


def _family_prefix(family: str, names) -> str:
  if family == "gpt2":
    return "transformer." if "transformer.wte.weight" in names else ""
  return "model."


def _locate(path: tuple, scanned: bool) -> tuple[tuple, int | None]:
  """Unscanned param path -> (path in the actual tree, layer index into its stacked axis)."""
  if scanned and path[0].startswith("blocks_"):
    return ("layers",) + path[1:], int(path[0][len("blocks_"):])
  return path, None


# ---------------------------------------------------------------------------- reading weights


def tensor_index(hf_path: str) -> dict:
  """{tensor name: (file, shape, dtype)} from the safetensors headers (no data read)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  index_path = os.path.join(hf_path, "model.safetensors.index.json")
  if os.path.exists(index_path):
    try:
      with open(index_path, encoding="utf-8") as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError) as e:
      raise HFError(f"{index_path} is not a safetensors index (no weight_map: {e})") from None
  elif os.path.exists(os.path.join(hf_path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    others = [n for n in os.listdir(hf_path) if n.endswith((".bin", ".pt", ".pth", ".h5"))]
    raise HFError(f"{hf_path} has no model.safetensors or model.safetensors.index.json"
                  + (f" (only {', '.join(sorted(others))}: convert them to safetensors first, e.g. "
                     f"with transformers' save_pretrained)" if others else ""))
  index = {}
  for name in files:
    path = os.path.join(hf_path, name)
    if not os.path.exists(path):
      raise HFError(f"shard {name} listed in model.safetensors.index.json is missing from "
                    f"{hf_path}: download it again")
    try:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          s = f.get_slice(key)
          index[key] = (path, tuple(s.get_shape()), s.get_dtype())
    except Exception as e:  # pylint: disable=broad-except  (SafetensorError is not exported)
      raise HFError(f"{path} is not a complete safetensors file ({e}): it may be truncated; "
                    f"download it again") from None
  return index


def _check_tensors(rules, index: dict, tie: bool) -> None:
  problems = []
  for r in rules:
    if r.hf not in index:
      problems.append(f"tensor {r.hf} is missing")
    elif index[r.hf][1] != r.hf_shape:
      problems.append(f"tensor {r.hf} has shape {list(index[r.hf][1])} but config.json implies "
                      f"{list(r.hf_shape)}")
  known = {r.hf for r in rules}
  extra = [k for k in index if k not in known and not _IGNORED.search(k)
           and not (tie and k == "lm_head.weight")]  # a tied head saved anyway: the same matrix
  if extra:
    problems.append(f"{len(extra)} tensor(s) llm_jax has no place for, e.g. {sorted(extra)[0]}: "
                    f"the checkpoint has parts config.json does not describe")
  _problems(problems, "the safetensors weights do not match config.json")


class _Reader:
  """Reads HF tensors by name, keeping the last few (GPT-2's c_attn feeds three params)."""

  def __init__(self, index):
    self.index, self.cache = index, {}

  def __call__(self, name):
    if name not in self.cache:
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      with safe_open(self.index[name][0], framework="numpy") as f:
        arr = f.get_tensor(name)
      if len(self.cache) >= 4:
        self.cache.pop(next(iter(self.cache)))
      self.cache[name] = arr
    return self.cache[name]


def load_params(hf_path: str, cfg, mesh=None, index=None):
  """(params placed in their shardings, model config) for the HF model in `hf_path` under the
  finalized import config `cfg`; HFError before any weight is read if the files do not fit."""
  mc = model_lib.ModelConfig.from_config(cfg)
  family = FAMILIES[read_config(hf_path)["model_type"]]
  index = tensor_index(hf_path) if index is None else index
  rules = _rules(mc, family, _family_prefix(family, index))
  _check_tensors(rules, index, mc.tie_embeddings)

  mesh = sharding_lib.make_mesh(cfg) if mesh is None else mesh
  boxed = jax.eval_shape(lambda key: model_lib.Transformer(mc).init(
      key, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.key(0))
  shardings = traverse_util.flatten_dict(
      sharding_lib.param_shardings(boxed, mesh, sharding_lib.logical_rules(cfg)))
  abstract = traverse_util.flatten_dict(nn.meta.unbox(boxed))
  source = {}  # unscanned path -> (rule, output index)
  for r in rules:
    for j, path in enumerate(r.ours):
      source[path] = (r, j)
  read = _Reader(index)

  def host(path):
    r, j = source[path]
    return r.to_ours(read(r.hf))[j]

  out = {}
  for path, leaf in abstract.items():
    if path[0] == "layers":
      arr = np.stack([host((f"blocks_{i}",) + path[1:]) for i in range(mc.n_layers)])
    else:
      arr = host(path)
    arr = np.ascontiguousarray(arr.astype(leaf.dtype))
    if arr.shape != leaf.shape:  # the rules and the model disagree: a bug, not bad input
      raise AssertionError(f"{'/'.join(path)}: mapped shape {arr.shape} != model's {leaf.shape}")
    out[path] = jax.make_array_from_callback(leaf.shape, shardings[path],
                                             lambda idx, a=arr: a[idx])
  return traverse_util.unflatten_dict(out), mc


def import_to_workdir(raw_cfg, hf_path: str, workdir: str, overrides: dict | None = None) -> dict:
  """--mode=import: writes the HF model in `hf_path` as a step-0 checkpoint in `workdir`.

  Everything is read and checked first; the workdir is written only at the end, and a workdir
  that already holds checkpoints is refused. Returns a summary for the user.
  """
  from llm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  hf = read_config(hf_path)
  cfg = import_config(raw_cfg, hf, overrides)
  try:
    tok = hf_tokenizer.from_hf_dir(hf_path)
  except ValueError as e:
    raise HFError(f"hf_path={hf_path!r}: {e}") from None
  if tok.vocab_size > cfg.vocab_size:
    raise HFError(f"the tokenizer in {hf_path} has {tok.vocab_size} tokens but config.json's "
                  f"vocab_size is {cfg.vocab_size}: the files come from different models")
  if ckpt_lib.saved_steps(workdir):  # (a killed import's leftovers are no checkpoint)
    raise HFError(f"--workdir={workdir} already holds checkpoints: import into a new workdir")
  index = tensor_index(hf_path)
  params, mc = load_params(hf_path, cfg, index=index)
  dtypes = sorted({d for _, _, d in index.values()})
  with cfg.unlocked():
    cfg.hf_path = os.path.abspath(hf_path)
  n = sum(int(np.prod(s)) for _, s, _ in index.values())
  try:
    ckpt_lib.save_params(workdir, 0, params, cfg.to_dict(), tok, {
        "imported_from": os.path.abspath(hf_path), "model_type": hf["model_type"],
        "source_dtypes": dtypes, "epoch": 0.0, "tokens_seen": 0})
  except Exception as e:  # pylint: disable=broad-except
    if not files.is_full(e):  # orbax's write is whole or absent: a rerun needs no cleanup
      raise
    raise files.disk_full(workdir, "the imported checkpoint",
                          n * jnp.dtype(cfg.param_dtype).itemsize) from None
  return {"model_type": hf["model_type"], "params": n, "dtypes": dtypes, "config": cfg,
          "tokenizer": tok, "model_config": mc}


# ---------------------------------------------------------------------------------- export


def export_family(mc: model_lib.ModelConfig) -> str:
  """"gpt2", "llama", "mistral" (a Llama with a sliding window) or "qwen2" for a model config;
  HFError naming the fields that fit neither."""
  gpt2 = {"position_embedding": "learned", "use_rms_norm": False, "use_bias": True,
          "qkv_bias": True, "n_kv_heads": mc.n_heads, "rope_scaling": "none",
          "sliding_window": None, "activation": ("gelu", "gelu_exact", "relu")}
  llama = {"position_embedding": "rope", "use_rms_norm": True, "activation": "swiglu"}
  common = {"d_k": mc.d_model // mc.n_heads if mc.d_model % mc.n_heads == 0 else -1,
            "d_v": mc.d_k}
  known = set(ARCH_FIELDS) | {"vocab_multiple", "dropout", "attention_dropout", "hidden_dropout",
                              "dtype", "param_dtype", "attention_impl", "remat_policy",
                              "scan_layers", "lora_alpha", "lora_targets", "lora_dropout",
                              "lora_train_embeddings", "lora_trainable_tokens",
                              "quant_group_size", "quantize_embeddings"}
  # Fields added after this mapping must keep their defaults to export (e.g. qk_norm=False).
  extra = {f.name: f.default for f in dataclasses.fields(mc) if f.name not in known}

  def misses(want):
    out = []
    for name, value in {**want, **extra}.items():
      have = mc.has_qkv_bias if name == "qkv_bias" else getattr(mc, name)
      allowed = value if isinstance(value, tuple) else (value,)
      if have not in allowed:
        out.append(f"{name} {have!r} -> {' or '.join(map(repr, allowed))}")
    return out

  llama_extra = {} if (not mc.use_bias or mc.has_qkv_bias) else {"qkv_bias": True}
  if mc.sliding_window is not None and mc.use_bias:  # Mistral (a windowed Llama) has no biases
    llama_extra["use_bias"] = False
  options = {"gpt2": misses({**gpt2, **common}),
             "llama": misses({**llama, "d_v": mc.d_k, **llama_extra})}
  if not options["gpt2"]:
    return "gpt2"
  if not options["llama"]:
    if mc.has_qkv_bias and not mc.use_bias:
      return "qwen2"
    return "llama" if mc.sliding_window is None else "mistral"
  nearest = min(options, key=lambda k: len(options[k]))
  other = "llama" if nearest == "gpt2" else "gpt2"
  raise HFError(f"this model maps to neither GPT-2 nor Llama, so it cannot be exported. "
                f"Nearest: {nearest}, which needs {', '.join(options[nearest])}. {other} needs "
                f"{', '.join(options[other])}.")


def export_workdir(cfg, workdir: str, out_dir: str, asked=()) -> list[str]:
  """--mode=export with hf_export_dir: the model in `workdir` (a LoRA run's adapters merged) in
  Hugging Face format; a model neither family fits is refused before any array is read."""
  from llm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from llm_jax import loader  # pylint: disable=g-import-not-at-top
  source, step = loader.locate(workdir, cfg.checkpoint_step)
  _, items = ckpt_lib.load_json(source, ("config",), step)
  if loader.stores_quantized(items["config"]):
    raise HFError(f"{workdir} stores quantized weights (an export made with load_in_8bit / "
                  f"load_in_4bit): export the full-precision run it came from instead")
  mc = model_lib.ModelConfig.from_config(loader.with_model_fields(cfg, items["config"], asked))
  export_family(dataclasses.replace(mc, lora_r=0))
  loaded = loader.load(workdir, cfg, step=cfg.checkpoint_step, asked=asked, merge=True)
  return export(loaded.model_cfg, loaded.params, loaded.tokenizer, out_dir)


_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def hf_config(mc: model_lib.ModelConfig, family: str, tok) -> dict:
  """config.json of the exported model."""
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  if family == "gpt2":
    act = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}[mc.activation]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": mc.vocab_size, "n_positions": mc.max_position_embeddings,
            "n_embd": mc.d_model, "n_layer": mc.n_layers, "n_head": mc.n_heads,
            "n_inner": mc.d_ff, "activation_function": act, "layer_norm_epsilon":
            mc.layer_norm_eps, "tie_word_embeddings": mc.tie_embeddings,
            "embd_pdrop": mc.dropout, "resid_pdrop": mc.dropout,
            "attn_pdrop": mc.attention_dropout, "dtype": _TORCH_DTYPES[mc.param_dtype], **ids}
  rope, positions = None, mc.max_position_embeddings
  if mc.rope_scaling != "none":
    rope = {"rope_type": mc.rope_scaling}
    for key, field in HF_ROPE_KEYS.items():
      if field in config_lib.rope_params(mc.rope_scaling) and getattr(mc, field) is not None:
        rope[key] = getattr(mc, field)
    if mc.rope_scaling == "dynamic":  # transformers' dynamic NTK grows past max_position_embeddings
      positions = rope.pop("original_max_position_embeddings")
  arch = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
  out = {"architectures": [arch.get(family, "LlamaForCausalLM")],
         "model_type": family, "vocab_size": mc.vocab_size, "hidden_size": mc.d_model,
         "intermediate_size": mc.d_ff, "num_hidden_layers": mc.n_layers,
         "num_attention_heads": mc.n_heads, "num_key_value_heads": mc.n_kv_heads,
         "head_dim": mc.d_k, "max_position_embeddings": positions,
         "rms_norm_eps": mc.layer_norm_eps, "hidden_act": "silu",
         "tie_word_embeddings": mc.tie_embeddings, "attention_dropout": mc.attention_dropout,
         # transformers 4's spelling: transformers 5 reads it too (into rope_parameters).
         "rope_theta": mc.rope_theta, "rope_scaling": rope,
         "dtype": _TORCH_DTYPES[mc.param_dtype], **ids}
  if family == "qwen2":
    window = mc.sliding_window is not None
    out.update(use_sliding_window=window, sliding_window=mc.sliding_window,
               max_window_layers=0 if window else mc.n_layers)
  elif family == "mistral":
    out.update(sliding_window=mc.sliding_window)
  else:
    out.update(attention_bias=mc.use_bias, mlp_bias=mc.use_bias)
  return out


def _to_host(x) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export(mc: model_lib.ModelConfig, params, tok, out_dir: str,
           max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes the model (`params` of `mc`, tokenizer `tok`) to `out_dir` in Hugging Face format.

  Tensors are gathered to the host one param (one layer's slice of a scanned param) at a time
  and written in files of at most `max_shard_bytes` (with model.safetensors.index.json when there
  are several), in param_dtype. Only process 0 writes. Returns the files written.
  """
  family = export_family(mc)
  if tok.vocab_size > mc.vocab_size:
    raise HFError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                  f"{mc.vocab_size}")
  rules = _rules(mc, "gpt2" if family == "gpt2" else "llama",
                 "transformer." if family == "gpt2" else "model.")
  itemsize = np.dtype(jnp.dtype(mc.param_dtype)).itemsize
  shards, size = [[]], 0
  for r in rules:
    nbytes = int(np.prod(r.hf_shape)) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(r)
    size += nbytes
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  if jax.process_index() != 0:  # only process 0 writes; the others join the gathers
    _write_export(mc, params, tok, None, family, rules, shards, names, itemsize)
    return names
  # Built in a temporary directory renamed when complete (llm_jax/files.py): a signal, a kill or
  # a full disk leaves no half-written export in out_dir, and a rerun needs no cleanup.
  with files.building_dir(out_dir, "the Hugging Face export",
                          needed=sum(int(np.prod(r.hf_shape)) * itemsize for r in rules)) as tmp:
    written = _write_export(mc, params, tok, tmp, family, rules, shards, names, itemsize)
  logging.info("exported %s model to %s: %s", family, out_dir, ", ".join(written))
  return written


def _write_export(mc, params, tok, out_dir, family, rules, shards, names, itemsize) -> list[str]:
  """export's writing into `out_dir` (None: gather only, on a process that does not write)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  writer = out_dir is not None
  flat = traverse_util.flatten_dict(params)
  scanned = "layers" in params
  weight_map = {}
  for name, shard in zip(names, shards):
    tensors = {}
    for r in shard:
      parts = []
      for path in r.ours:
        where, layer = _locate(path, scanned)
        parts.append(_to_host(flat[where] if layer is None else flat[where][layer]))
      tensors[r.hf] = np.ascontiguousarray(r.to_hf(*parts))  # safetensors trap: contiguous only
      weight_map[r.hf] = name
    if writer:
      save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
  if not writer:
    return names
  written = list(names)
  if len(names) > 1:
    total = sum(int(np.prod(r.hf_shape)) * itemsize for r in rules)
    _write_json(out_dir, "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    written.append("model.safetensors.index.json")
  _write_json(out_dir, "config.json", hf_config(mc, family, tok))
  gen_eos = tok.eos_ids if len(tok.eos_ids) > 1 else tok.eos_id
  _write_json(out_dir, "generation_config.json",
              {"bos_token_id": tok.bos_id, "eos_token_id": gen_eos, "pad_token_id": tok.pad_id})
  written += ["config.json", "generation_config.json"]
  written += hf_tokenizer.write_hf_files(tok, out_dir, mc.max_position_embeddings)
  return written


def _write_json(out_dir, name, obj):
  with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
