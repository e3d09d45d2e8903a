"""One way from a trained model on disk to what eval, sample, export and fine-tuning start from.

`load(source, cfg)` turns a workdir (its latest checkpoint, or cfg.checkpoint_step) or a
checkpoint directory (<workdir>/checkpoints/<step>) into a `Loaded`: the config with the
checkpoint's model fields, the ModelConfig, the params (a LoRA run's base with its adapters;
quantized when load_in_8bit / load_in_4bit ask), the tokenizer, the saved config and the step.
It builds no optimizer. An imported model is a workdir like any other.

Model fields are read back: the checkpoint decides every field that changes what its weights
compute (FUNCTION_FIELDS, e.g. rope_theta, layer_norm_eps) or their shapes (SHAPE_FIELDS). A
different value asked for on the command line (`asked`) is ignored with a warning, or refused
naming the fields when it is a shape; values that only the config file differs in are replaced.
The context a model runs at (CONTEXT_FIELDS, ROPE_FIELDS: max_seq_len, sliding_window, RoPE
scaling) is the checkpoint's too unless asked: then the asked value wins (context extension).

A LoRA run's checkpoint holds its adapters, and a `base` item: the base checkpoint's directory and
a fingerprint of its params (random projections of every leaf, computed where the params live).
Its base is loaded from there and refused if its content changed. `start_finetune` is what
`train.run` calls for a run with init_from.
"""

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import lora
from llm_jax import model as model_lib
from llm_jax import quantize
from llm_jax import sharding
from llm_jax import tokenizer as tokenizer_lib

CheckpointError = checkpoint.CheckpointError
# Taken from the checkpoint; asking for another value is refused (the arrays would not fit).
SHAPE_FIELDS = ("vocab_size", "vocab_multiple", "d_model", "n_heads", "n_kv_heads", "n_layers",
                "d_ff", "d_k", "d_v", "max_position_embeddings", "scan_layers", "qkv_bias",
                "qk_norm")
# Taken from the checkpoint; asking for another value warns (the weights were trained with it).
FUNCTION_FIELDS = ("position_embedding", "rope_theta", "activation", "use_rms_norm",
                   "layer_norm_eps", "use_bias", "tie_embeddings")
# Taken from the checkpoint unless asked: asking for another value extends (or narrows) the
# context the weights run at, which is what RoPE scaling is for (README: Long context). The
# scaling's fields go together: asking for any of them takes all of them from the command line.
CONTEXT_FIELDS = ("max_seq_len", "sliding_window")
ROPE_FIELDS = ("rope_scaling",) + config_lib.ROPE_PARAM_FIELDS
# A LoRA run's adapters: their shapes, and their scale.
LORA_SHAPE_FIELDS = ("lora_r", "lora_targets", "lora_train_embeddings", "lora_trainable_tokens")
LORA_FUNCTION_FIELDS = ("lora_alpha",)
# How a LoRA run's base was quantized when it trained, or how an export stored its weights.
QUANT_FIELDS = ("load_in_8bit", "load_in_4bit", "quant_type", "quant_group_size",
                "quantize_embeddings")


@dataclasses.dataclass
class Loaded:
  cfg: ml_collections.ConfigDict  # the given config with the checkpoint's model fields
  model_cfg: model_lib.ModelConfig
  params: Any  # what model_lib.build(model_cfg) applies
  tokenizer: Any
  saved_config: dict
  step: int
  path: str  # the checkpoint directory read
  mesh: jax.sharding.Mesh
  fingerprint: list | None = None  # of the full-precision params, when asked for
  quantization: str | None = None  # what quantizing saved, for printing


def locate(source: str, step: int | None = None) -> tuple[str, int | None]:
  """(workdir, step) of a workdir (step as given; None = latest) or a checkpoint directory."""
  path = os.path.abspath(source)
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(os.path.basename(path))
  return path, step


def _same(a, b) -> bool:
  return a == b or (isinstance(a, (list, tuple)) and list(a) == list(b))


def stores_quantized(saved: dict) -> bool:
  """Whether a checkpoint (its saved config) holds quantized weights: an export made with
  load_in_8bit / load_in_4bit (a training run never saves quantized weights)."""
  return not saved.get("lora_r", 0) and bool(saved.get("load_in_8bit")
                                             or saved.get("load_in_4bit"))


def with_model_fields(cfg, saved: dict, asked=(), *, lora: bool = False, quant: bool = False):
  """`cfg` with the model fields of a checkpoint's saved config (see the module docstring).

  lora: also take a LoRA run's adapter fields; quant: also the quantization fields (a LoRA run's
  base, or weights stored quantized). Otherwise the result keeps cfg's own. Raises
  CheckpointError naming the shape fields asked to change.
  """
  shape, function = SHAPE_FIELDS, FUNCTION_FIELDS
  if lora:
    shape, function = shape + LORA_SHAPE_FIELDS, function + LORA_FUNCTION_FIELDS
  if quant:
    function += QUANT_FIELDS
  values, refused = cfg.to_dict(), []
  rope_asked = any(f in asked for f in ROPE_FIELDS)
  kind = saved.get("rope_scaling", "none")
  # A checkpoint from before a field existed had it off (None); parameters its scaling does not
  # read are None too (older checkpoints stored defaults there, e.g. factor 1.0).
  theirs = {f: (saved.get(f) if f in config_lib.rope_params(kind) else None)
            for f in config_lib.ROPE_PARAM_FIELDS}
  theirs.update(rope_scaling=kind, sliding_window=saved.get("sliding_window"))
  if "max_seq_len" in saved:
    theirs["max_seq_len"] = saved["max_seq_len"]
  for field, value in theirs.items():
    if _same(value, cfg[field]):
      continue
    if field in asked or (field in ROPE_FIELDS and rope_asked):
      logging.info("%s=%r as asked (the checkpoint has %r): the context the model runs at "
                   "changes, its weights do not", field, cfg[field], value)
    else:
      values[field] = value
  for field in shape + function:
    if field not in saved or _same(saved[field], cfg[field]):
      continue
    line = f"{field}: the checkpoint has {saved[field]!r}, the command line asks {cfg[field]!r}"
    if field in asked:
      if field in shape:
        refused.append(line)
        continue
      logging.warning("using the checkpoint's %s=%r, not %r: its weights were trained with it",
                      field, saved[field], cfg[field])
    else:
      logging.info("model field from the checkpoint: %s=%r (the config says %r)", field,
                   saved[field], cfg[field])
    values[field] = tuple(saved[field]) if isinstance(saved[field], list) else saved[field]
  if refused:
    raise CheckpointError("the checkpoint's model has another shape than the command line "
                          "asks:\n  " + "\n  ".join(refused) + "\nDrop these --config "
                          "overrides: the model's fields come from the checkpoint.")
  if values["block_size"] > values["max_seq_len"] and "block_size" not in asked:
    values["block_size"] = values["max_seq_len"]
  try:
    return config_lib.finalize(ml_collections.ConfigDict(values))
  except config_lib.ConfigError as e:
    raise CheckpointError(f"with the checkpoint's model fields, {e}") from None


def abstract(model_cfg, mesh, rules):
  """(unboxed abstract params with their shardings, shardings) of build(model_cfg)."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(model_lib.build(model_cfg).init, jax.random.key(0), dummy)["params"]
  shardings = sharding.param_shardings(boxed, mesh, rules)
  return sharding.with_shardings(nn.meta.unbox(boxed), shardings), shardings


def _restore(workdir, step, model_cfg, mesh, rules):
  """(params, tokenizer or None) of a checkpoint whose `params` item build(model_cfg) holds
  (a LoRA run's: its adapters alone; an export's: maybe quantized)."""
  target, shardings = abstract(model_cfg, mesh, rules)
  if model_cfg.lora_r:
    _, target = lora.split(target)
    _, shardings = lora.split(shardings)
  params, _, _, tok = checkpoint.load_params(workdir, quantize.for_storage(target), shardings,
                                             step)
  return quantize.from_storage(params, target), tok


def quantized(params, model_cfg, mesh, rules):
  """params (plain, full precision) -> the quantized model's, sharded like the kernels."""
  plain = dataclasses.replace(model_cfg, lora_r=0)
  target, shardings = abstract(plain, mesh, rules)
  fn = lambda p: quantize.quantize_params(p, target, model_cfg.scan_layers,
                                          model_cfg.compute_dtype)
  with jax.set_mesh(mesh):
    return jax.jit(fn, out_shardings=shardings)(params)


@jax.jit
def _projections(params):
  """One random projection per leaf (fixed keys), normalized by the leaf's size."""
  return jnp.stack([jnp.sum(x.astype(jnp.float32) * jax.random.normal(jax.random.key(i), x.shape))
                    / np.sqrt(x.size) for i, x in enumerate(jax.tree.leaves(params))])


def fingerprint(params) -> list[float]:
  """A content fingerprint of full-precision params: cheap, and computed where they are sharded."""
  return [float(v) for v in jax.device_get(_projections(params))]


def _tokenizer(workdir: str, tok, cfg):
  """The checkpoint's tokenizer, else the workdir's or cfg.tokenizer_path."""
  if tok is not None:
    return tok
  return tokenizer_lib.load(cfg.tokenizer_path or os.path.join(workdir, "tokenizer.model"))


def _save_tokenizer(tok, workdir: str) -> None:
  tok.save(os.path.join(workdir, "tokenizer.model"))  # tokenizer_lib.load reads any kind back


def _quantize_base(params, model_cfg, mesh, rules):
  """(params with their base quantized as model_cfg.quant says, a line saying what it saved)."""
  base, adapters = lora.split(params)
  before = quantize.param_bytes(base)
  base = quantized(base, model_cfg, mesh, rules)
  after = quantize.param_bytes(base)
  group = ("per channel" if model_cfg.quant == "int8"
           else f"in groups of {model_cfg.quant_group_size}")
  note = (f"{model_cfg.quant} weights {group}: parameters {before / 2**20:.2f} MiB -> "
          f"{after / 2**20:.2f} MiB ({before / max(after, 1):.1f}x smaller)")
  return lora.combine(base, adapters), note


def load(source: str, cfg, *, step: int | None = None, asked=(), mesh=None, merge: bool = False,
         with_fingerprint: bool = False) -> Loaded:
  """The model at `source` (a workdir or a checkpoint directory), ready to apply.

  cfg: the config asked for (its load_in_8bit / load_in_4bit and mesh are used; its model fields
  are replaced by the checkpoint's). step: of a workdir (None = latest). asked: fields given on
  the command line. mesh: where the params go (default: cfg's mesh). merge: fold a LoRA run's
  adapters into its base, giving plain params that cfg's load_in_* then quantize like any
  checkpoint's; unmerged, a LoRA run is loaded as it trained: its base quantized as it was, its
  adapters beside it. with_fingerprint: fingerprint the params before cfg's quantization.
  """
  workdir, step = locate(source, step)
  step, items = checkpoint.load_json(workdir, ("config", "base"), step)
  saved = items["config"]
  lora_run, stored = saved.get("lora_r", 0) > 0, stores_quantized(saved)
  if lora_run and not items["base"]:
    raise CheckpointError(f"{checkpoint.checkpoint_dir(workdir)}/{step} is a LoRA run's "
                          f"checkpoint without the reference to its base model")
  if not lora_run and cfg.lora_r and "lora_r" in asked:
    logging.warning("lora_r=%d is ignored: %s holds no LoRA adapters", cfg.lora_r, workdir)
  as_trained = lora_run and not merge
  cfg = with_model_fields(cfg, saved, asked, lora=as_trained, quant=as_trained or stored)
  if not lora_run or merge:
    with cfg.unlocked():
      cfg.lora_r = 0
  mesh = sharding.make_mesh(cfg) if mesh is None else mesh
  rules = sharding.logical_rules(cfg)
  model_cfg = model_lib.ModelConfig.from_config(cfg)
  note = None
  if lora_run:
    # The base as the run trained against it: full precision, then quantized as the run's config
    # says (QLoRA); its adapters beside it.
    base_cfg = config_lib.finalize(ml_collections.ConfigDict(
        {**cfg.to_dict(), "load_in_8bit": False, "load_in_4bit": False, "lora_r": 0}))
    base = load(items["base"]["path"], base_cfg, mesh=mesh, merge=True, with_fingerprint=True)
    check_base(items["base"], base.fingerprint, workdir)
    run_cfg = model_lib.ModelConfig.from_config(
        with_model_fields(cfg, saved, lora=True, quant=True))
    params, note = base.params, base.quantization
    if run_cfg.quant and not stores_quantized(base.saved_config):
      params, note = _quantize_base(params, run_cfg, mesh, rules)
    run_tok = _tokenizer(workdir, None, cfg) if os.path.exists(
        cfg.tokenizer_path or os.path.join(workdir, "tokenizer.model")) else base.tokenizer
    if run_tok.vocab_size > base.tokenizer.vocab_size:  # chat markers the run added (chat.py)
      params = fit_vocab(params, base.tokenizer.vocab_size, run_tok.vocab_size, run_cfg)
    adapters, tok = _restore(workdir, step, run_cfg, mesh, rules)
    params = lora.combine(params, adapters)
    if merge:
      params = lora.merge(params, run_cfg)
  else:
    params, tok = _restore(workdir, step, model_cfg if stored else
                             dataclasses.replace(model_cfg, quant=""), mesh, rules)
  fp = fingerprint(params) if with_fingerprint else None
  if stored:
    note = (f"{model_cfg.quant} weights as stored: parameters "
            f"{quantize.param_bytes(params) / 2**20:.2f} MiB")
  elif model_cfg.quant and (merge or not lora_run):
    params, note = _quantize_base(params, model_cfg, mesh, rules)
  return Loaded(cfg=cfg, model_cfg=model_cfg, params=params,
                tokenizer=_tokenizer(workdir, tok, cfg), saved_config=saved, step=step,
                path=os.path.join(checkpoint.checkpoint_dir(workdir), str(step)), mesh=mesh,
                fingerprint=fp, quantization=note)


def base_reference(base: Loaded) -> dict:
  """What a LoRA run's checkpoints record of its base."""
  return {"path": base.path, "step": base.step, "fingerprint": base.fingerprint}


def check_base(reference: dict, found: list, who: str) -> None:
  """Refuses a base whose params are not those `reference` recorded."""
  want = np.asarray(reference["fingerprint"])
  got = np.asarray(found)
  if want.shape != got.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-6):
    raise CheckpointError(
        f"the base model {reference['path']} changed since {who} was trained on it (its params' "
        f"fingerprint differs): its LoRA adapters fit only the base they were trained with. "
        f"Restore that checkpoint, or fine-tune the new base in a new --workdir.")


def check_train(cfg) -> None:
  """Raises UserError (exit 2) for fine-tuning fields a training run cannot honour."""
  fail = errors.UserError
  if cfg.lora_r and not cfg.init_from:
    raise fail(f"lora_r={cfg.lora_r} needs init_from: LoRA adapts a trained model; set "
               f"--config.init_from=<its workdir>, or lora_r=0 to train from scratch")
  if cfg.lora_r and cfg.optimizer == "muon":  # training only: eval / sample need no optimizer
    raise fail(f"optimizer='muon' with lora_r={cfg.lora_r}: LoRA trains only its adapters, which "
               f"are not the projection kernels Muon orthogonalises, so all of them would train "
               f"with Muon's AdamW part; use --config.optimizer=adamw (or --config.lora_r=0 for "
               f"a full fine-tune with Muon)")
  if (cfg.load_in_8bit or cfg.load_in_4bit) and not cfg.lora_r:
    field = "load_in_8bit" if cfg.load_in_8bit else "load_in_4bit"
    raise fail(f"{field}=True with lora_r=0: quantized weights are not trained; set "
               f"lora_r > 0 to train LoRA adapters over a quantized base (QLoRA), or "
               f"{field}=False for full fine-tuning")
  tables = "lora_train_embeddings=True" if cfg.lora_train_embeddings else (
      f"lora_trainable_tokens={cfg.lora_trainable_tokens!r}" if cfg.lora_trainable_tokens else "")
  if tables and not cfg.lora_r:
    raise fail(f"{tables} with lora_r=0: full fine-tuning trains every embedding row and the "
               f"head already; set lora_r > 0 to train them beside LoRA adapters, or unset it")
  if tables and cfg.quantize_embeddings and (cfg.load_in_8bit or cfg.load_in_4bit):
    raise fail(f"{tables} with quantize_embeddings=True: a quantized output head is not trained; "
               f"set quantize_embeddings=False (the head then stays in the compute dtype)")
  if cfg.init_from and cfg.tokenizer_path:
    raise fail(f"tokenizer_path={cfg.tokenizer_path!r} with init_from: a fine-tune keeps "
               f"its base's tokenizer (copied into the workdir); unset tokenizer_path")


def _with_token_ids(cfg, tokenizer, vocab_size: int):
  """cfg with lora_trainable_tokens as the token ids it names (what the run saves and applies)."""
  ids = lora.resolve_tokens(cfg.lora_trainable_tokens, tokenizer, vocab_size)
  if ids != cfg.lora_trainable_tokens:
    logging.info("lora_trainable_tokens=%r: token ids %s (%s)", cfg.lora_trainable_tokens, ids,
                 ", ".join(repr(tokenizer.id_to_piece(int(i))) for i in ids.split(",")))
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.lora_trainable_tokens = ids
  return cfg


def fit_vocab(params, old_n: int, new_n: int, model_cfg):
  """params whose embedding (and untied head) hold model_cfg.padded_vocab rows, ids old_n ..
  new_n - 1 (tokens added to the tokenizer) initialised to the mean of rows 0 .. old_n - 1.
  Deterministic: a LoRA run's base is refitted the same way every time it is loaded."""
  params = dict(params)

  def fit(table, axis):
    if not isinstance(table, jax.Array) or table.ndim != 2:
      raise errors.UserError("the chat template adds tokens, but the base's output head is "
                             "quantized (quantize_embeddings=True): unset quantize_embeddings")
    rows = jnp.moveaxis(table, axis, 0)
    mean = jnp.mean(rows[:old_n].astype(jnp.float32), axis=0).astype(rows.dtype)
    grown = jnp.zeros((max(model_cfg.padded_vocab, rows.shape[0]),) + rows.shape[1:], rows.dtype)
    grown = grown.at[:rows.shape[0]].set(rows).at[old_n:new_n].set(mean)
    out = jnp.moveaxis(grown, 0, axis)
    sharding = getattr(table, "sharding", None)
    return jax.device_put(out, sharding) if isinstance(sharding, jax.sharding.NamedSharding) \
        else out

  params["embed"] = {**params["embed"], "embedding": fit(params["embed"]["embedding"], 0)}
  if "lm_head" in params:
    params["lm_head"] = {**params["lm_head"], "kernel": fit(params["lm_head"]["kernel"], 1)}
  return params


def _chat_tokens(cfg, tok, asked):
  """For a new SFT run: (cfg, tokenizer) with the chat template's markers added as tokens when
  the tokenizer lacks them (vocab_size grown to hold them) and, with LoRA, those markers'
  embedding rows trained (lora_trainable_tokens) unless the command line set that field. A
  model trained here never saw its markers in pretraining, so they are trained too."""
  from llm_jax import chat  # pylint: disable=import-outside-toplevel  (data-side; late)
  template = chat.resolve_template(tok, cfg.chat_template, f"init_from={cfg.init_from}")
  missing = chat.missing_markers(template, tok)
  new = chat.add_markers(tok, missing) if missing else tok
  if cfg.chat_template and new.hf_config is not None:  # the template travels with the tokenizer
    new.hf_config = {**new.hf_config, "chat_template": template}
  markers = missing if not tok.is_own else [m for m in chat.MARKERS if m in template]
  ids = [new.encode(m)[0] for m in markers]
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.vocab_size = max(cfg.vocab_size, new.vocab_size)
    if (cfg.lora_r and ids and "lora_trainable_tokens" not in asked
        and not cfg.lora_trainable_tokens):
      cfg.lora_trainable_tokens = ",".join(map(str, ids))
      logging.warning("lora_trainable_tokens=%s: the chat markers %s train beside the adapters "
                      "(set --config.lora_trainable_tokens to choose others)",
                      cfg.lora_trainable_tokens, ", ".join(markers))
  if missing:
    logging.warning("added the chat template's %s to the tokenizer as ids %s (embedding rows "
                    "initialised to the mean of the others)", ", ".join(missing),
                    [new.encode(m)[0] for m in missing])
  return config_lib.finalize(cfg), new


def _dpo_chats(cfg) -> bool:
  """Whether a DPO run's pairs are conversations (TRL's messages form): rendered with the chat
  template, whose markers the tokenizer must then hold, as for SFT."""
  from llm_jax import dpo  # pylint: disable=import-outside-toplevel  (data-side; late)
  train, val = dpo.load_pairs(cfg)
  return dpo.in_messages(train + val)


def start_finetune(cfg, workdir: str, mesh, asked=()):
  """For a training run with init_from: (its config, the loaded base or None, the base reference).

  A new run takes the base's model fields (a shape asked otherwise is refused) and a copy of its
  tokenizer; only its params are used: a full fine-tune starts from them, LoRA keeps them frozen
  (quantized as cfg asks, or as an export stored them). A resumed run (the workdir has
  checkpoints) resumes itself: its own config decides, and the base is loaded again only for LoRA,
  from the checkpoint its run recorded, and refused if it changed.
  """
  reference, own = None, None
  if os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    try:
      _, own = checkpoint.load_json(workdir, ("config", "base"))
    except CheckpointError:
      own = None  # no readable checkpoint yet: a new run
  if own is not None:
    saved, reference = own["config"], own["base"]
    if cfg.lora_trainable_tokens:  # as ids, like the run saved them
      cfg = _with_token_ids(cfg, tokenizer_lib.load(os.path.join(workdir, "tokenizer.model")),
                            saved["vocab_size"])
    cfg = with_model_fields(cfg, saved, asked, lora=bool(reference), quant=bool(reference))
    source = reference["path"] if reference else None
  else:
    base_workdir, step = locate(cfg.init_from)
    try:
      step, items = checkpoint.load_json(base_workdir, ("config",), step)
    except CheckpointError as e:
      raise CheckpointError(f"init_from={cfg.init_from}: {e}") from None
    saved, source = items["config"], cfg.init_from
    if stores_quantized(saved) and not cfg.lora_r:
      raise errors.UserError(f"init_from={cfg.init_from} holds quantized weights, which are "
                             f"not trained: set lora_r > 0 (LoRA over them), or start from the "
                             f"full-precision run")
    cfg = with_model_fields(cfg, saved, asked, quant=stores_quantized(saved))
  if source is None:
    return cfg, None, reference
  base = load(source, cfg, mesh=mesh, merge=True, with_fingerprint=bool(cfg.lora_r))
  tok = base.tokenizer
  if own is None and (cfg.objective == "sft" or (cfg.objective == "dpo" and _dpo_chats(cfg))):
    cfg, tok = _chat_tokens(cfg, tok, asked)
  elif own is not None:
    tok = tokenizer_lib.load(os.path.join(workdir, "tokenizer.model"))
  if tok.vocab_size > base.tokenizer.vocab_size:
    model_cfg = dataclasses.replace(base.model_cfg, vocab_size=cfg.vocab_size)
    base = dataclasses.replace(base, tokenizer=tok, model_cfg=model_cfg, params=fit_vocab(
        base.params, base.tokenizer.vocab_size, tok.vocab_size, model_cfg))
  if own is None and cfg.lora_r and cfg.lora_trainable_tokens:
    cfg = _with_token_ids(cfg, tok, cfg.vocab_size)
  if reference:
    check_base(reference, base.fingerprint, workdir)
  if own is None:
    os.makedirs(workdir, exist_ok=True)
    _save_tokenizer(tok, workdir)
  return cfg, base, base_reference(base) if cfg.lora_r else None


def export(cfg, workdir: str, asked=()) -> str:
  """--mode=export: the run in `workdir` (adapters merged) as a plain checkpoint in
  cfg.export_dir, quantized when load_in_8bit / load_in_4bit ask (a QLoRA run's base is
  dequantized to merge). Returns the checkpoint directory written."""
  loaded = load(workdir, cfg, step=cfg.checkpoint_step, asked=asked, merge=True)
  out = dict(loaded.cfg.to_dict(), init_from=None, export_dir=None, tokenizer_path=None,
             checkpoint_step=None)
  # The tokenizer first: the checkpoint, written whole by orbax, is what makes the export one
  # (a run stopped before it leaves a directory that a rerun exports into).
  _save_tokenizer(loaded.tokenizer, cfg.export_dir)
  return checkpoint.save_params(cfg.export_dir, loaded.step, quantize.for_storage(loaded.params),
                                out, loaded.tokenizer, meta={"exported_from": loaded.path})
