"""Config validation and derived values: the one place a config is checked and completed.

`finalize(cfg)` returns a locked copy with every derived field filled in (d_k, d_v, d_ff,
n_kv_heads, qkv_bias, block_size, max_position_embeddings, batch_size / micro_batch_size,
min_learning_rate, lora_alpha) and raises `ConfigError` listing every problem at once, each
naming the field, the value and the fix, before anything is compiled or written.
`mode_problems(cfg, mode, given)` names the fields given on the command line that do nothing
in a mode (refused when ignoring them could cost the user, else warned).
"""

import logging
import os

import ml_collections

from llm_jax import errors

DTYPES = ("float32", "float16", "bfloat16")
LR_DECAYS = ("cosine", "linear", "exponential", "constant", "wsd")
ACTIVATIONS = ("relu", "gelu", "gelu_exact", "swiglu", "relu2")
# Each RoPE scaling's parameters as Hugging Face names them (README: Long context): (required,
# optional). One table for validation, the loader and the Hugging Face import and export.
ROPE_PARAMS = {
    "none": ((), ()),
    "linear": (("rope_scaling_factor",), ()),
    "dynamic": (("rope_scaling_factor", "rope_original_max_len"), ()),
    "yarn": (("rope_scaling_factor", "rope_original_max_len"),
             ("rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "rope_mscale",
              "rope_mscale_all_dim", "rope_truncate")),
    "llama3": (("rope_scaling_factor", "rope_original_max_len", "rope_low_freq_factor",
                "rope_high_freq_factor"), ()),
}
ROPE_SCALINGS = tuple(ROPE_PARAMS)
ROPE_PARAM_FIELDS = ("rope_scaling_factor", "rope_original_max_len", "rope_low_freq_factor",
                     "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow",
                     "rope_attention_factor", "rope_mscale", "rope_mscale_all_dim",
                     "rope_truncate")
_ROPE_HINTS = {"rope_scaling_factor": "the context gained: 4 runs at 512 what trained at 128",
               "rope_original_max_len": "the context the model was trained at, e.g. 128",
               "rope_low_freq_factor": "Llama 3.1: 1", "rope_high_freq_factor": "Llama 3.1: 4"}
OPTIMIZERS = ("adamw", "lion", "adafactor", "sgd", "muon", "schedule_free_adamw")
POSITION_EMBEDDINGS = ("rope", "sinusoidal", "learned")
REMAT_POLICIES = ("none", "full", "dots")
GRAD_ACCUM = ("scan", "multisteps")
TOKENIZER_TYPES = ("unigram", "bpe")
TEXT_SPLITS = ("file", "paragraph", "line")
QUANT_TYPES = ("nf4", "int4")
OBJECTIVES = ("lm", "sft", "dpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo")
CONTEXT_PARALLEL_IMPLS = ("all_gather", "ring")


class ConfigError(errors.UserError):
  """One or more config fields are invalid; the message lists each with its fix."""

  def __init__(self, problems):
    self.problems = list(problems)
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"{len(self.problems)} problem(s) in the config:\n{lines}")


def _derive(c, given=frozenset()):
  """Fills None-valued derived fields in place. Returns problems found while deriving.

  `given`: the fields set on the command line. Of batch_size, micro_batch_size and
  gradient_accumulation_steps, a value given there wins over the config file's: batch_size
  alone re-derives micro_batch_size, micro_batch_size alone re-derives batch_size.
  """
  problems = []
  if "batch_size" in given and "micro_batch_size" not in given:
    c.micro_batch_size = None
  elif "micro_batch_size" in given and "batch_size" not in given:
    c.batch_size = None
  if c.n_kv_heads is None:
    c.n_kv_heads = c.n_heads
  if c.qkv_bias is None:
    c.qkv_bias = c.use_bias
  if c.d_k is None:
    if c.n_heads > 0 and c.d_model % c.n_heads:
      problems.append(
          f"n_heads={c.n_heads} does not divide d_model={c.d_model}, so d_k cannot be derived: "
          f"pick n_heads from the divisors of {c.d_model} or set d_k explicitly")
    c.d_k = c.d_model // c.n_heads if c.n_heads > 0 else 0
  if c.d_v is None:
    c.d_v = c.d_k
  if c.d_ff is None:
    c.d_ff = 4 * c.d_model
  if c.block_size is None:
    c.block_size = c.max_seq_len
  if c.max_position_embeddings is None:
    c.max_position_embeddings = c.max_seq_len
  if c.min_learning_rate is None:
    c.min_learning_rate = c.learning_rate / 10
  if c.lora_alpha is None:
    c.lora_alpha = 2.0 * c.lora_r
  accum = c.gradient_accumulation_steps
  if c.batch_size is None and c.micro_batch_size is None:
    problems.append("batch_size and micro_batch_size are both unset: set micro_batch_size")
  elif c.micro_batch_size is None and accum > 0:
    if c.batch_size < 1:
      problems.append(f"batch_size={c.batch_size} must be >= 1")
    elif c.batch_size % accum:
      lower = c.batch_size // accum * accum
      problems.append(
          f"batch_size={c.batch_size} is not a multiple of gradient_accumulation_steps={accum}, "
          f"so micro_batch_size cannot be derived: set batch_size to a multiple of {accum} "
          f"(e.g. {lower or accum} or {lower + accum}), or set micro_batch_size and "
          f"gradient_accumulation_steps instead")
    else:
      c.micro_batch_size = c.batch_size // accum
  elif c.batch_size is None:
    c.batch_size = c.micro_batch_size * accum
  return problems


# Upper bounds of the shape fields, far past any model (Llama 3.1 405B: d_model 16,384, d_ff
# 53,248, vocab 128,256; Gemma: vocab 262,144): larger values are typos, and would overflow the
# int32 shapes and indices of the compiled programs (or exhaust the host building tables).
_MOST = {"d_model": 1 << 20, "d_ff": 1 << 22, "d_k": 1 << 16, "d_v": 1 << 16, "n_heads": 1 << 14,
         "n_kv_heads": 1 << 14, "vocab_size": 1 << 24, "vocab_multiple": 1 << 16,
         "n_layers": 1 << 16, "max_seq_len": 1 << 30, "block_size": 1 << 30,
         "max_position_embeddings": 1 << 30}


def _check(c):
  """Returns one message per invalid field."""
  p = []

  def need(cond, msg):
    if not cond:
      p.append(msg)

  for f in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "d_k", "d_v", "max_seq_len",
            "block_size", "max_position_embeddings", "n_kv_heads", "vocab_multiple"):
    need(c[f] > 0, f"{f}={c[f]} must be a positive integer")
  for f, most in _MOST.items():
    need(c[f] <= most, f"{f}={c[f]} is beyond what any model holds (at most {most:,} here): "
         f"is it a typo?")
  if c.n_kv_heads > 0 and c.n_heads > 0:
    need(c.n_heads % c.n_kv_heads == 0,
         f"n_kv_heads={c.n_kv_heads} does not divide n_heads={c.n_heads}: use a divisor of "
         f"{c.n_heads} (n_kv_heads=n_heads is plain multi-head attention, 1 is multi-query)")
  need(c.block_size <= c.max_seq_len,
       f"block_size={c.block_size} exceeds max_seq_len={c.max_seq_len}: lower block_size or raise "
       f"max_seq_len")
  if c.position_embedding == "learned":
    need(c.block_size <= c.max_position_embeddings,
         f"block_size={c.block_size} exceeds max_position_embeddings={c.max_position_embeddings} "
         f"with learned positions: raise max_position_embeddings or lower block_size")
    need(c.max_seq_len <= c.max_position_embeddings,
         f"max_seq_len={c.max_seq_len} exceeds max_position_embeddings="
         f"{c.max_position_embeddings} with learned positions: generation could index past the "
         f"table; raise max_position_embeddings")
  if c.position_embedding == "rope" and c.d_k > 0:
    need(c.d_k % 2 == 0, f"d_k={c.d_k} is odd but position_embedding='rope' rotates pairs of "
         f"dimensions: use an even d_k (set d_k, or pick n_heads so d_model / n_heads is even)")
  need(c.rope_theta > 0, f"rope_theta={c.rope_theta} must be > 0 (10000 is standard)")
  p.extend(_rope_problems(c))
  if c.sliding_window is not None:
    need(c.sliding_window >= 1, f"sliding_window={c.sliding_window} must be a positive number "
         f"of tokens (Mistral 7B: 4096), or None for full causal attention")
    need(c.sliding_window <= c.max_seq_len,
         f"sliding_window={c.sliding_window} is larger than the context max_seq_len="
         f"{c.max_seq_len}, so it would do nothing: set sliding_window <= {c.max_seq_len}, or "
         f"None for full causal attention")
  need(0 <= c.seed < 2**63, f"seed={c.seed} must be a non-negative integer (< 2**63)")
  need(c.layer_norm_eps > 0, f"layer_norm_eps={c.layer_norm_eps} must be > 0 (1e-5 or 1e-6)")

  for f, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("lr_decay", LR_DECAYS),
                     ("optimizer", OPTIMIZERS),
                     ("activation", ACTIVATIONS), ("position_embedding", POSITION_EMBEDDINGS),
                     ("remat_policy", REMAT_POLICIES), ("grad_accum", GRAD_ACCUM),
                     ("tokenizer_type", TOKENIZER_TYPES), ("text_split", TEXT_SPLITS),
                     ("objective", OBJECTIVES)):
    need(c[f] in allowed, f"{f}={c[f]!r} is not one of {', '.join(allowed)}")

  for f in ("dropout", "attention_dropout", "hidden_dropout", "lora_dropout"):
    need(0.0 <= c[f] < 1.0, f"{f}={c[f]} must be in [0, 1) (0 turns it off)")

  # Optimizer and schedule.
  need(c.learning_rate > 0, f"learning_rate={c.learning_rate} must be > 0 (1e-4 to 1e-3 pretraining)")
  need(0 <= c.min_learning_rate <= c.learning_rate,
       f"min_learning_rate={c.min_learning_rate} must be in [0, learning_rate={c.learning_rate}]")
  if c.lr_decay == "exponential":
    need(c.min_learning_rate > 0,
         "min_learning_rate=0 with lr_decay='exponential': exponential decay needs a floor > 0")
  need(c.warmup_steps >= 0, f"warmup_steps={c.warmup_steps} must be >= 0")
  for f in ("beta1", "beta2"):
    need(0.0 <= c[f] < 1.0, f"{f}={c[f]} must be in [0, 1) (0.9 / 0.95-0.999 are usual)")
  need(c.epsilon > 0, f"epsilon={c.epsilon} must be > 0 (1e-8 is usual)")
  need(c.weight_decay >= 0, f"weight_decay={c.weight_decay} must be >= 0 (0.01-0.1 is usual)")
  need(c.max_grad_norm >= 0, f"max_grad_norm={c.max_grad_norm} must be >= 0 (0 = no clipping)")
  need(c.z_loss >= 0, f"z_loss={c.z_loss} must be >= 0 (1e-4 is usual, 0 = off)")
  need(0.0 < c.decay_fraction <= 1.0,
       f"decay_fraction={c.decay_fraction} must be in (0, 1] (lr_decay='wsd' decays over this "
       f"share of the steps; 0.1-0.2 is usual)")
  for f in ("momentum", "muon_momentum"):
    need(0.0 <= c[f] < 1.0, f"{f}={c[f]} must be in [0, 1) (0.9 / 0.95 are usual)")
  need(c.muon_learning_rate > 0,
       f"muon_learning_rate={c.muon_learning_rate} must be > 0 (0.02 is usual)")
  need(c.muon_ns_steps >= 1, f"muon_ns_steps={c.muon_ns_steps} must be >= 1 (5 is usual)")
  if c.muon_consistent_rms is not None:
    need(c.muon_consistent_rms > 0, f"muon_consistent_rms={c.muon_consistent_rms} must be > 0 "
         f"(0.2 matches AdamW's update size), or None for width scaling")
  need(0.0 < c.adafactor_decay_rate <= 1.0,
       f"adafactor_decay_rate={c.adafactor_decay_rate} must be in (0, 1] (0.8 is usual)")
  need(c.adafactor_clipping_threshold >= 0, f"adafactor_clipping_threshold="
       f"{c.adafactor_clipping_threshold} must be >= 0 (1.0 is usual, 0 = off)")
  if c.adafactor_momentum is not None:
    need(0.0 <= c.adafactor_momentum < 1.0, f"adafactor_momentum={c.adafactor_momentum} must be "
         f"in [0, 1) (0.9 is usual), or None for no momentum")
  need(c.adafactor_min_dim_size_to_factor >= 1, f"adafactor_min_dim_size_to_factor="
       f"{c.adafactor_min_dim_size_to_factor} must be >= 1 (128 is usual)")
  need(c.weight_lr_power >= 0, f"weight_lr_power={c.weight_lr_power} must be >= 0 (2.0 is usual)")
  if c.optimizer == "schedule_free_adamw":
    need(c.beta1 > 0, f"beta1={c.beta1} with optimizer='schedule_free_adamw': its interpolation "
         f"needs beta1 > 0 (0.9 is usual)")

  # Batches.
  need(c.gradient_accumulation_steps >= 1,
       f"gradient_accumulation_steps={c.gradient_accumulation_steps} must be >= 1")
  if c.micro_batch_size is not None:
    need(c.micro_batch_size >= 1, f"micro_batch_size={c.micro_batch_size} must be >= 1")
  if c.batch_size is not None and c.micro_batch_size is not None:
    mb, accum = c.micro_batch_size, c.gradient_accumulation_steps
    fixes = [f"--config.batch_size={mb * accum}"]
    if accum >= 1 and c.batch_size % accum == 0:
      fixes.append(f"--config.micro_batch_size={c.batch_size // accum}")
    need(c.batch_size == mb * accum,
         f"batch_size={c.batch_size} != micro_batch_size={mb} x gradient_accumulation_steps="
         f"{accum}: set {' or '.join(fixes)} (of the three, give two; the third is derived)")

  # Training control.
  if c.num_train_steps is None:
    need(c.num_train_epochs is not None and c.num_train_epochs > 0,
         f"num_train_epochs={c.num_train_epochs} must be > 0 when num_train_steps is unset")
  else:
    need(c.num_train_steps >= 1, f"num_train_steps={c.num_train_steps} must be >= 1")
  for f in ("eval_steps", "save_steps", "save_every_epochs"):
    need(c[f] >= 0, f"{f}={c[f]} must be >= 0 (0 = only at the end / off)")
  need(c.log_every >= 1, f"log_every={c.log_every} must be >= 1")
  need(c.max_to_keep >= 1, f"max_to_keep={c.max_to_keep} must be >= 1")
  if c.eval_batches is not None:
    need(c.eval_batches >= 1, f"eval_batches={c.eval_batches} must be >= 1 (None = whole split)")
  if c.checkpoint_step is not None:
    need(c.checkpoint_step >= 1, f"checkpoint_step={c.checkpoint_step} must be a saved step >= 1 "
         f"(None = the latest)")
  need(c.loss_explosion_factor == 0 or c.loss_explosion_factor > 1,
       f"loss_explosion_factor={c.loss_explosion_factor} must be > 1 (or 0 = off)")

  # Data.
  ds = c.dataset
  chat = c.objective == "sft"  # dataset: conversation files (chat.py reads them)
  need(chat or not c.train_on_prompt,
       f"train_on_prompt=True does nothing with objective={c.objective!r}: it is for "
       f"objective='sft' (conversations); remove it")
  need(chat or ds == "shakespeare" or ds.startswith(("text:", "tfds:", "mix:")),
       f"dataset={ds!r} is not shakespeare, text:<dir or glob>, tfds:<name>[/<config>] or "
       f"mix:<weight>*<dataset>,...")
  if ds.startswith("mix:"):
    from llm_jax import sources  # late: only a mixture needs its parser
    try:
      mix = sources.parse_mixture(ds)
    except errors.UserError as e:
      mix = []
      need(False, str(e))
    for _, part in mix:
      need(part == "shakespeare" or part.startswith(("text:", "tfds:")),
           f"dataset={ds!r}: source {part!r} is not shakespeare, text:<dir or glob> or "
           f"tfds:<name>")
    need(not c.validation, f"validation={c.validation!r} does nothing with a mixture "
         f"(dataset='mix:...'): each source holds out its validation_fraction; remove it")
  need(c.eval_tokens >= 0, f"eval_tokens={c.eval_tokens} must be >= 0 (0 = whole split)")
  need(c.tokenize_workers is None or c.tokenize_workers >= 1,
       f"tokenize_workers={c.tokenize_workers} must be >= 1 (None = the host's cores)")
  need(0.0 < c.validation_fraction < 1.0,
       f"validation_fraction={c.validation_fraction} must be in (0, 1)")
  need(c.data_workers >= 0, f"data_workers={c.data_workers} must be >= 0")
  need(c.prefetch >= 0, f"prefetch={c.prefetch} must be >= 0")
  # Fields that only some datasets read: set for another, they would do nothing.
  kind = "chat" if chat else ds.split(":", 1)[0]
  base = {"validation": "", "validation_fraction": 0.05, "text_key": "text", "text_split": "file",
          "tfds_data_dir": None}
  readers = {"validation": ("text", "tfds", "chat"),
             "validation_fraction": ("text", "tfds", "chat"),
             "text_key": ("text", "tfds"), "text_split": ("text",), "tfds_data_dir": ("tfds",)}
  for f, kinds in readers.items():
    need(c[f] == base[f] or kind in kinds or kind == "mix",
         f"{f}={c[f]!r} does nothing with dataset={ds!r} (only {' and '.join(kinds)}: datasets "
         f"read it): remove it" + (" (the shakespeare validation split is fixed: the last 2 plays)"
                                   if kind == "shakespeare" and f.startswith("validation") else ""))
  if kind == "text" and c.validation:
    need(c.validation_fraction == base["validation_fraction"],
         f"validation_fraction={c.validation_fraction} does nothing when validation="
         f"{c.validation!r} names the validation files: remove one of them")

  # Decoding.
  need(c.temperature > 0,
       f"temperature={c.temperature} must be > 0: for deterministic output use do_sample=False")
  need(0.0 < c.top_p <= 1.0, f"top_p={c.top_p} must be in (0, 1] (1.0 = off)")
  need(c.top_k >= 0, f"top_k={c.top_k} must be >= 0 (0 = off)")
  need(c.repetition_penalty > 0,
       f"repetition_penalty={c.repetition_penalty} must be > 0 (1.0 = off, 1.0-1.2 usual)")
  need(c.num_beams >= 1, f"num_beams={c.num_beams} must be >= 1 (1 = no beam search)")
  need(c.max_new_tokens >= 1, f"max_new_tokens={c.max_new_tokens} must be >= 1")
  need(c.num_return_sequences >= 1,
       f"num_return_sequences={c.num_return_sequences} must be >= 1 (rows per prompt)")
  if c.num_return_sequences > 1 and c.num_beams == 1:
    need(c.do_sample, f"num_return_sequences={c.num_return_sequences} with greedy decoding "
         f"(do_sample=False, num_beams=1) gives the same text every time: set do_sample=True, "
         f"or num_beams >= {c.num_return_sequences}")
  if c.num_beams > 1:
    need(c.num_return_sequences <= c.num_beams,
         f"num_return_sequences={c.num_return_sequences} > num_beams={c.num_beams}: beam search "
         f"returns at most num_beams hypotheses per prompt")
  need(0 <= c.min_length <= c.max_new_tokens,
       f"min_length={c.min_length} must be in [0, max_new_tokens={c.max_new_tokens}]")
  if c.num_beams > 1:
    need(not c.do_sample,
         f"num_beams={c.num_beams} with do_sample=True: beam search is deterministic; set "
         f"do_sample=False (or num_beams=1 to sample)")

  # Serving.
  need(0 <= c.serve_port <= 65535, f"serve_port={c.serve_port} must be in [0, 65535]")
  for f in ("serve_slots", "serve_max_queue", "serve_max_n", "serve_max_body_bytes"):
    need(c[f] >= 1, f"{f}={c[f]} must be >= 1")
  need(c.serve_max_n <= c.serve_max_queue,
       f"serve_max_n={c.serve_max_n} > serve_max_queue={c.serve_max_queue}: a request of n "
       f"choices queues n sequences, so one at the limit could never be accepted")
  need(c.serve_max_tokens is None or c.serve_max_tokens >= 1,
       f"serve_max_tokens={c.serve_max_tokens} must be >= 1 (None = the model's context)")
  need(c.serve_api_key is None or bool(c.serve_api_key.strip()),
       "serve_api_key is empty: give a key, or leave it unset for an open server")

  # Quantization and LoRA (what a mode does with them: loader.py, train.py).
  need(not (c.load_in_8bit and c.load_in_4bit),
       "load_in_8bit and load_in_4bit are both True: choose one")
  need(c.quant_type in QUANT_TYPES, f"quant_type={c.quant_type!r} is not one of "
       f"{', '.join(QUANT_TYPES)}")
  need(c.quant_group_size >= 1, f"quant_group_size={c.quant_group_size} must be >= 1 (64 is usual)")
  need(c.lora_r >= 0, f"lora_r={c.lora_r} must be >= 0 (0 = off)")
  if c.lora_r > 0:
    need(c.lora_alpha > 0, f"lora_alpha={c.lora_alpha} must be > 0 (None = 2 * lora_r)")
    from llm_jax import lora  # late: the rest of validation needs no jax
    try:
      lora.target_paths(c.lora_targets, None)
    except ValueError as e:
      p.append(str(e))
  need(not (c.lora_train_embeddings and str(c.lora_trainable_tokens).strip()),
       f"lora_trainable_tokens={c.lora_trainable_tokens!r} with lora_train_embeddings=True: the "
       f"whole embedding trains already; set only one of them")

  # Objective (train.py, dpo.py).
  need(c.objective in OBJECTIVES,
       f"objective={c.objective!r} is not one of {', '.join(OBJECTIVES)}")
  if c.objective == "dpo":
    need(c.dpo_beta > 0, f"dpo_beta={c.dpo_beta} must be > 0 (0.1 is usual)")
    need(0.0 <= c.dpo_label_smoothing < 0.5,
         f"dpo_label_smoothing={c.dpo_label_smoothing} must be in [0, 0.5) (0 = plain DPO)")
    need(c.dpo_loss_type in DPO_LOSS_TYPES,
         f"dpo_loss_type={c.dpo_loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    need(c.dpo_label_smoothing == 0.0 or c.dpo_loss_type == "sigmoid",
         f"dpo_label_smoothing={c.dpo_label_smoothing} does nothing with dpo_loss_type="
         f"{c.dpo_loss_type!r} (only the sigmoid loss smooths its labels): remove it")
    need(not c.pack_segments, "pack_segments=True does nothing with objective='dpo' (each pair "
         "is its own padded row): remove it")
  else:
    for f, default in (("dpo_beta", 0.1), ("dpo_label_smoothing", 0.0),
                       ("dpo_loss_type", "sigmoid")):
      need(c[f] == default, f"{f}={c[f]!r} does nothing with objective={c.objective!r}: set "
           f"--config.objective=dpo, or remove it")

  # Parallelism.
  if c.logical_axis_rules:
    from llm_jax import sharding  # late: the rest of validation needs no jax
    try:
      sharding._parse_rules(c.logical_axis_rules)  # pylint: disable=protected-access
    except ValueError as e:
      p.append(str(e))
  shapes_ok = True
  for f in ("mesh_shape", "dcn_mesh_shape"):
    shape = tuple(c[f])
    ok = (len(shape) in (3, 4) and all(isinstance(s, int) and (s >= 1 or s == -1) for s in shape)
          and list(shape).count(-1) <= 1)
    shapes_ok &= ok
    need(ok, f"{f}={shape} must be 4 integers (data, fsdp, tensor, context) or 3 (context 1), "
         f"each >= 1 or one of them -1")
  need(c.context_parallel_impl in CONTEXT_PARALLEL_IMPLS,
       f"context_parallel_impl={c.context_parallel_impl!r} must be one of "
       f"{', '.join(CONTEXT_PARALLEL_IMPLS)}")
  if shapes_ok:
    from llm_jax import sharding  # late: the rest of validation needs no jax
    degree = sharding.context_degree(c)
    if degree is not None:
      for msg in context_problems(c, degree):
        p.append(msg)
  for f in ("num_fewshot", "tasks_limit", "tasks_every"):
    need(c[f] >= 0, f"{f}={c[f]} must be >= 0")
  need(c.tasks_batch_size >= 1, f"tasks_batch_size={c.tasks_batch_size} must be >= 1")
  if c.tasks_dir is not None:
    need(os.path.isdir(c.tasks_dir), f"tasks_dir={c.tasks_dir!r} is not a folder: give the folder "
         f"that holds the task files (hellaswag.jsonl, ...)")
  if c.compile_topology:
    from llm_jax import topology  # late, and jax-free: names only
    try:
      topology.parse_target(c.compile_topology)
    except errors.UserError as e:  # an unknown TPU slice or GPU target
      p.append(str(e))
    need(-1 not in tuple(c.dcn_mesh_shape),
         f"dcn_mesh_shape={tuple(c.dcn_mesh_shape)} with compile_topology: give every entry (their "
         f"product is the number of slices to compile for), no -1")
  need(c.compile_what in ("train", "decode"),
       f"compile_what={c.compile_what!r} must be train or decode")
  return p


def rope_params(scaling: str) -> tuple[str, ...]:
  """The config fields a RoPE scaling reads (required, then optional)."""
  required, optional = ROPE_PARAMS.get(scaling, ((), ()))
  return required + optional


def _rope_problems(c) -> list[str]:
  """rope_scaling and its parameters: each type's required ones set, no other one set."""
  kind, p = c.rope_scaling, []
  if kind not in ROPE_PARAMS:
    return [f"rope_scaling={kind!r} is not one of {', '.join(ROPE_SCALINGS)}: set one of them "
            f"(README: Long context)"]
  if kind != "none" and c.position_embedding != "rope":
    p.append(f"rope_scaling={kind!r} needs position_embedding='rope' (have "
             f"{c.position_embedding!r}): set rope_scaling='none'")
  required = ROPE_PARAMS[kind][0]
  for f in required:
    if c[f] is None:
      p.append(f"rope_scaling={kind!r} needs {f}: set --config.{f}=... ({_ROPE_HINTS[f]})")
  for f in ROPE_PARAM_FIELDS:
    if c[f] is not None and f not in rope_params(kind):
      readers = [k for k in ROPE_PARAMS if f in rope_params(k)]
      p.append(f"{f}={c[f]!r} does nothing with rope_scaling={kind!r} (only "
               f"{' / '.join(readers)} read{'s' if len(readers) == 1 else ''} it): remove it, "
               f"or set rope_scaling to "
               f"{' or '.join(repr(r) for r in readers)}")
  for f in ("rope_scaling_factor", "rope_original_max_len", "rope_low_freq_factor",
            "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow", "rope_attention_factor",
            "rope_mscale", "rope_mscale_all_dim"):
    if f in rope_params(kind) and c[f] is not None and not c[f] > 0:
      p.append(f"{f}={c[f]} must be > 0" + (f" ({_ROPE_HINTS[f]})" if f in _ROPE_HINTS else ""))
  low, high = c.rope_low_freq_factor, c.rope_high_freq_factor
  if kind == "llama3" and low and high and low > 0 and not low < high:
    p.append(f"rope_low_freq_factor={low} and rope_high_freq_factor={high} must satisfy "
             f"low < high (Llama 3.1: 1 and 4)")
  fast, slow = c.rope_beta_fast or 32, c.rope_beta_slow or 1
  if kind == "yarn" and fast > 0 and slow > 0 and not slow < fast:
    p.append(f"rope_beta_fast={fast} must be > rope_beta_slow={slow} (YaRN's defaults: 32 and 1)")
  return p


def context_problems(c, degree: int) -> list[str]:
  """What stops context parallelism over `degree` devices (the mesh's context axis) for `c`:
  the training sequence must split into `degree` shards (2 * degree chunks with load balancing),
  and the fused attention kernels cannot take a sharded sequence. Checked here when mesh_shape
  names the degree, and again by sharding.make_mesh when its -1 resolves to it."""
  if degree <= 1:
    return []
  p = []
  chunks = degree * (2 if c.context_load_balance else 1)
  if c.block_size % chunks:
    lb = (f" x 2 chunks per device (context_load_balance=True: a front and a back chunk)"
          if c.context_load_balance else "")
    p.append(f"block_size={c.block_size} does not split over context parallelism {degree}{lb}: "
             f"use a block_size that is a multiple of {chunks}, or change the context entry "
             f"of mesh_shape")
  if c.use_flash_attention:
    p.append(f"use_flash_attention=True cannot take a sequence sharded over context {degree} "
             f"(the cuDNN and Pallas kernels attend within one device's shard): set "
             f"--config.use_flash_attention=False (context_parallel_impl={c.context_parallel_impl} "
             f"attends over the shards), or context 1 in mesh_shape")
  return p


def finalize(cfg: ml_collections.ConfigDict, given=()) -> ml_collections.ConfigDict:
  """Returns a validated copy of `cfg` with derived fields filled; raises ConfigError.

  `given`: names of the fields set on the command line (see `_derive`).
  """
  c = ml_collections.ConfigDict(cfg.to_dict())  # unlocked, FieldReferences resolved
  problems = _derive(c, frozenset(given))
  problems += _check(c)
  if problems:
    raise ConfigError(problems)
  c.lock()
  return c


def cache_dir(c) -> str:
  """Where built datasets, tokenized corpora and compiled programs are cached."""
  return (c.data_dir or os.environ.get("LLM_JAX_CACHE")
          or os.path.join(os.path.expanduser("~"), ".cache", "llm_jax"))


def flash_attention_backend(c, backend: str) -> str:
  """Which attention implementation `c` gets on `backend` ('cpu', 'gpu', 'tpu'): xla|cudnn|pallas.

  use_flash_attention where the hardware or dtype cannot do it warns once and uses XLA.
  """
  if not c.use_flash_attention:
    return "xla"
  if backend == "gpu":
    if c.dtype not in ("bfloat16", "float16"):
      logging.warning("use_flash_attention: cuDNN attention needs dtype bfloat16 or float16, not "
                      "%s; using XLA attention. Set --config.dtype=bfloat16 to use it.", c.dtype)
      return "xla"
    if c.d_k % 8 or c.d_k > 256 or c.d_v != c.d_k:
      logging.warning("use_flash_attention: cuDNN attention needs d_k == d_v, a multiple of 8 and "
                      "<= 256 (have d_k=%d, d_v=%d); using XLA attention.", c.d_k, c.d_v)
      return "xla"
    return "cudnn"
  if backend == "tpu":
    if c.sliding_window is not None:
      raise ConfigError([f"use_flash_attention=True with sliding_window={c.sliding_window} on TPU: "
                         f"the Pallas flash kernel has no sliding window; set "
                         f"use_flash_attention=False (XLA attention applies the window)"])
    return "pallas"
  logging.warning("use_flash_attention: no fused attention on backend %r; using XLA attention.",
                  backend)
  return "xla"


def load_unchecked(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (`path[:arg]`), as written: nothing derived or checked."""
  import importlib.util
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_llm_jax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def load(path: str, **overrides) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file (`path[:arg]`), applies overrides, finalizes.

  The programmatic twin of `--config=path --config.field=value`, for tests and benchmarks.
  """
  cfg = load_unchecked(path)
  for k, v in overrides.items():
    if k not in cfg:
      raise ConfigError([unknown_field(k, cfg)])
    cfg[k] = v
  return finalize(cfg, given=overrides)


def unknown_field(names, fields) -> str:
  """The message for config fields that do not exist (a name or a list), each with the closest
  existing one of `fields` suggested."""
  names = [names] if isinstance(names, str) else list(names)
  fields = list(fields.keys() if hasattr(fields, "keys") else fields)
  parts = []
  for name in names:
    close = errors.closest(name, fields)
    parts.append(f"{name!r}" + (f" (did you mean {close}?)" if close else ""))
  return (f"unknown config field {', '.join(parts)}: every field is listed, with its default, "
          f"in configs/base.py and README's field table")


# Fields that only some modes read. Given on the command line in another mode, they would do
# nothing: a mistake worth a warning (refused where acting on it could cost the user).
_TRAINING = ("learning_rate", "min_learning_rate", "warmup_steps", "lr_decay", "beta1", "beta2",
             "epsilon", "weight_decay", "decay_embeddings", "max_grad_norm", "z_loss",
             "num_train_steps", "num_train_epochs", "eval_steps", "eval_batches", "save_steps",
             "save_every_epochs", "max_to_keep", "log_every", "sample_every_eval",
             "loss_explosion_factor", "dropout", "attention_dropout", "hidden_dropout",
             "remat_policy", "grad_accum", "data_workers", "prefetch", "tasks_every",
             "objective", "dpo_beta", "dpo_label_smoothing", "dpo_loss_type")
_DECODING = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
             "length_penalty", "max_new_tokens", "min_length", "use_cache", "stop_token",
             "num_return_sequences")
_READ_BY = {
    "train": set(_TRAINING) | set(_DECODING) - {"max_new_tokens", "min_length", "stop_token",
                                                  "num_return_sequences"},  # eval samples: 64
    "eval": {"checkpoint_step", "objective", "dpo_beta", "dpo_label_smoothing",
             "dpo_loss_type"},  # a DPO run's eval: its loss and reward accuracy
    "sample": {"checkpoint_step"} | set(_DECODING),
    "estimate": {"remat_policy", "grad_accum", "dropout", "attention_dropout", "hidden_dropout"},
    "export": {"checkpoint_step"},
    "tasks": {"checkpoint_step"} | set(_DECODING),
    "compile": {"remat_policy", "grad_accum", "dropout", "attention_dropout", "hidden_dropout"},
    "serve": {"checkpoint_step"},  # requests carry their own decoding knobs
    "chat": {"checkpoint_step"} | set(_DECODING),
}
# eval_batches caps the periodic evaluations only: --mode=eval always covers the whole split.


def mode_problems(c, mode: str, given) -> tuple[list[str], list[str]]:
  """(errors, warnings) about fields given on the command line that `mode` does not read."""
  errs, warns = [], []
  if mode == "train" and c.checkpoint_step is not None:
    errs.append(f"checkpoint_step={c.checkpoint_step} is for --mode=eval and --mode=sample; "
                f"training always resumes from the latest checkpoint (to branch from step "
                f"{c.checkpoint_step}, copy checkpoints/{c.checkpoint_step} into a new workdir)")
  mode_only = set(_TRAINING) | set(_DECODING) | {"checkpoint_step"}
  unread = [f for f in given if f in mode_only and f not in _READ_BY[mode]
            and not (f == "checkpoint_step" and mode == "train")]
  if unread:
    names = ", ".join(f"--config.{f}" for f in unread)
    warns.append(f"{names} {'does' if len(unread) == 1 else 'do'} nothing in --mode={mode}"
                 + (" (--mode=eval always evaluates the whole validation split)"
                    if "eval_batches" in unread and mode == "eval" else ""))
  return errs, warns
