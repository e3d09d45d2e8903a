"""Hugging Face config.json <-> llm_jax model fields, both ways.

Import: `read_config` reads a model directory's config.json, `model_fields` maps it onto the
model fields (GPT-2 and the Llama family: Llama, Mistral, Qwen2; RoPE scaling and sliding
windows as transformers defines them), refusing what cannot be mapped with every reason at once,
before any weight is read; `import_config` makes the run's config from them. Export:
`export_family` says which family a model config fits (or names what fits neither) and
`hf_config` writes its config.json. The weights, both ways, are hf.py's.
"""

import dataclasses
import json
import logging
import os

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import model as model_lib

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
DEFAULT_BLOCK_SIZE = 1024


class HFError(errors.UserError):
  """The Hugging Face directory (or the model to export) cannot be used; says why and what to do."""


def raise_problems(problems, what):
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
  raise_problems(problems, f"config.json (model_type={mt!r}) cannot be mapped onto llm_jax's model")
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
