"""Parameter, memory and FLOP estimates, before anything is allocated (`--mode=estimate`).

The parameter count is exact: it comes from `jax.eval_shape` of the model's init. Memory is given
twice: the parameter reference's three rough formulas, as the sheet writes them, beside our byte
count of params + gradients + optimizer state + activations, so the difference is visible. On
request, XLA compiles one train step and reports what it will really allocate.
"""

import dataclasses
import math

import jax
import numpy as np

from llm_jax import metrics
from llm_jax import model as model_lib

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3


def param_shapes(cfg):
  """Abstract params (ShapeDtypeStructs) of the model `cfg` describes; nothing is allocated."""
  mcfg = model_lib.ModelConfig.from_config(cfg)
  return jax.eval_shape(lambda k: model_lib.init_params(mcfg, k), jax.random.key(0))


def _group(path) -> str:
  names = metrics.path_names(path)
  joined = "/".join(names).lower()
  if "embed" in joined:
    return "embeddings"
  if "lm_head" in joined:
    return "output head"
  if names[-1] == "scale" or "norm" in joined:
    return "norms"
  if any(s in joined for s in ("attn", "attention", "query", "key", "value", "out_proj", "qkv")):
    return "attention"
  if any(s in joined for s in ("mlp", "ffn", "wi", "wo", "gate", "up", "down")):
    return "ffn"
  return "other"


def param_breakdown(shapes) -> dict:
  """Parameter count per group (embeddings, attention, ffn, norms, output head, other)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    g = _group(path)
    out[g] = out.get(g, 0) + int(np.prod(leaf.shape))
  return out


@dataclasses.dataclass
class Estimate:
  n_params: int
  breakdown: dict
  flops_per_token: float
  sheet: dict  # the parameter reference's three formulas, in bytes
  exact: dict  # our byte counts, per item


def activation_bytes(cfg) -> int:
  """Activation memory of one micro-batch's forward pass kept for the backward pass.

  Per block, Korthikanti et al. (2022) count B*T*D*(34 + 5*N*T/D) bytes at 16-bit for GPT blocks;
  scaled to the compute dtype. Full remat keeps only each block's input (B*T*D) plus one block's
  working set. Logits and their gradient are fp32 [B, T, V].
  """
  b, t, d, n = cfg.micro_batch_size, cfg.block_size, cfg.d_model, cfg.n_heads
  scale = _BYTES[cfg.dtype] / 2
  # Fused (flash) attention never stores the [B, N, T, S] scores: the 5*N*T/D term goes.
  scores = 0 if cfg.use_flash_attention else 5 * n * t / d
  per_block = b * t * d * (34 + scores) * scale
  if cfg.remat_policy == "full":
    blocks = cfg.n_layers * b * t * d * _BYTES[cfg.dtype] + per_block
  elif cfg.remat_policy == "dots":
    blocks = cfg.n_layers * per_block * 0.5  # matmul outputs kept, elementwise recomputed
  else:
    blocks = cfg.n_layers * per_block
  vocab = math.ceil(cfg.vocab_size / cfg.vocab_multiple) * cfg.vocab_multiple
  logits = 2 * b * t * vocab * 4
  return int(blocks + logits)


def estimate(cfg) -> Estimate:
  shapes = param_shapes(cfg)
  breakdown = param_breakdown(shapes)
  n = sum(breakdown.values())
  p_bytes = _BYTES[cfg.param_dtype]
  sheet_model = (cfg.vocab_size * cfg.d_model + cfg.n_layers * cfg.d_model**2) * _BYTES[cfg.dtype]
  sheet = {
      "Model Memory": sheet_model,
      "Training Memory": sheet_model * (3 + cfg.gradient_accumulation_steps),
      "Attention Memory": (cfg.micro_batch_size * cfg.n_heads * cfg.block_size**2 * cfg.d_k
                           * _BYTES[cfg.dtype]),
  }
  opt = 2 * n * p_bytes  # Adam mu and nu, stored like the params
  if cfg.grad_accum == "multisteps" and cfg.gradient_accumulation_steps > 1:
    opt += n * 4  # optax.MultiSteps keeps an fp32 accumulator of the gradients
  elif cfg.gradient_accumulation_steps > 1:
    opt += n * 4  # the scan carries a running sum of the gradients
  exact = {
      "params": n * p_bytes,
      "gradients": n * p_bytes,
      "optimizer state": opt,
      "activations (estimate, one micro-batch)": activation_bytes(cfg),
  }
  exact["total"] = sum(exact.values())
  fpt = metrics.flops_per_token(cfg, metrics.count_params(shapes))
  return Estimate(n, breakdown, fpt, sheet, exact)


def compiled_memory(cfg) -> dict:
  """Compiles one train step for the current devices and returns XLA's memory analysis in bytes.

  The "will it fit" answer: nothing but the compiled program is created.
  """
  from llm_jax import train  # late import: train imports this module's neighbours
  compiled = train.compile_train_step(cfg)
  m = compiled.memory_analysis()
  if m is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "alias_size_in_bytes")
  out = {f: int(getattr(m, f, 0) or 0) for f in fields}
  out["peak (arguments + outputs + temporaries - aliased)"] = (
      out["argument_size_in_bytes"] + out["output_size_in_bytes"] + out["temp_size_in_bytes"]
      - out["alias_size_in_bytes"])
  return out


def _fmt_bytes(b: float) -> str:
  return f"{b / GIB:10.3f} GiB" if b >= 0.01 * GIB else f"{b / 1024**2:10.2f} MiB"


def report(cfg, est: Estimate, compiled: dict | None = None) -> str:
  """A readable table of the estimate."""
  lines = [f"Model: d_model={cfg.d_model} n_layers={cfg.n_layers} n_heads={cfg.n_heads} "
           f"n_kv_heads={cfg.n_kv_heads} d_ff={cfg.d_ff} vocab={cfg.vocab_size} "
           f"block_size={cfg.block_size} dtype={cfg.dtype} param_dtype={cfg.param_dtype}",
           "", "Parameters (exact, from jax.eval_shape)"]
  for g in ("embeddings", "attention", "ffn", "norms", "output head", "other"):
    if est.breakdown.get(g):
      lines.append(f"  {g:<40}{est.breakdown[g]:>16,}")
  lines.append(f"  {'total':<40}{est.n_params:>16,}  ({est.n_params / 1e6:.1f}M)")
  lines += ["", f"FLOPs per token (6N + 12*L*n_heads*d_k*T): {est.flops_per_token:.3e}",
            f"FLOPs per optimizer step: {est.flops_per_token * cfg.batch_size * cfg.block_size:.3e}",
            "", "Memory, the parameter reference's formulas (rough):"]
  for k, v in est.sheet.items():
    lines.append(f"  {k:<40}{_fmt_bytes(v)}")
  lines.append("  (its Model Memory counts n_layers * d_model^2 per model, where a block holds "
               "about 12 * d_model^2)")
  lines += ["", f"Memory, our count at micro_batch_size={cfg.micro_batch_size} "
            f"(params {cfg.param_dtype}, AdamW):"]
  for k, v in est.exact.items():
    lines.append(f"  {k:<40}{_fmt_bytes(v)}")
  if compiled:
    lines += ["", f"XLA memory analysis of one compiled train step on {jax.devices()[0].device_kind}"
              f" x{jax.device_count()} (per device):"]
    for k, v in compiled.items():
      lines.append(f"  {k:<52}{_fmt_bytes(v)}")
  return "\n".join(lines)
