"""FLOP and MFU accounting, the device peak table, metric writers and loss plots.

Owns how a run is measured and recorded:
  * `flops_per_token` / `mfu`: model FLOP utilization, counted as in DESIGN.md
    (6 * N + attention FLOPs per token, N = parameters without position embeddings).
  * `peak_flops_per_device`: dense bf16 peak by jax `device_kind` (None where MFU means nothing).
  * `MetricWriter`: one JSON line per call in <workdir>/metrics.jsonl, TensorBoard scalars in
    <workdir>/tensorboard (tensorboardX, no TensorFlow) and a console line.
  * `plot_losses`: train/eval loss (and eval bits per character) against step, as a PNG.

Metric keys are "<split>/<name>": TRAIN_LOSS, EVAL_LOSS and EVAL_BPC below are the ones
`plot_losses` reads.
"""

import json
import logging
import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

TRAIN_LOSS = "train/loss"
EVAL_LOSS = "eval/loss"
EVAL_BPC = "eval/bits_per_char"

# Dense (no sparsity) bf16 tensor-core / MXU peak FLOP/s per device, from the vendors' data
# sheets. Matched in order against the lower-cased device_kind, so more specific patterns
# come first ("tpu v5 lite" before "tpu v5", "h100 pcie" before "h100").
PEAK_BF16_FLOPS = (
    (("tpu v6 lite", "tpu v6e"), 918e12),
    (("tpu v5 lite", "tpu v5e", "tpu v5litepod"), 197e12),
    (("tpu v5p", "tpu v5"), 459e12),
    (("tpu v4",), 275e12),
    (("h100 pcie",), 756e12),
    (("h100 nvl",), 835e12),
    (("h100", "h200", "gh200"), 989e12),
    (("a100",), 312e12),
)


def peak_flops_per_device(device_kind: str) -> Optional[float]:
  """Dense bf16 peak FLOP/s for a jax `device_kind` string; None for CPUs and unknown devices.

  Case-insensitive substring match: "NVIDIA H100 80GB HBM3" -> 989e12, "TPU v5 lite" (v5e)
  -> 197e12, "TPU v5" / "TPU v5p" -> 459e12, "TPU v6 lite" (v6e) -> 918e12.
  """
  kind = device_kind.lower()
  for patterns, peak in PEAK_BF16_FLOPS:
    if any(p in kind for p in patterns):
      return peak
  return None


def device_peak_flops(device: Optional[jax.Device] = None) -> Optional[float]:
  """`peak_flops_per_device` of `device` (default: the first local device)."""
  device = device if device is not None else jax.local_devices()[0]
  return peak_flops_per_device(device.device_kind)


def path_names(path) -> list[str]:
  """A pytree key path (DictKey, GetAttrKey, SequenceKey, ...) as a list of strings."""
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
    else:
      names.append(str(entry))
  return names


def count_params(params, exclude_position_embeddings: bool = True) -> int:
  """Number of parameter scalars in `params` (a pytree of arrays or ShapeDtypeStructs).

  A tied embedding is one leaf, so it counts once. With exclude_position_embeddings, leaves
  under a "pos_embed" key (the learned position table) are left out, as MFU requires: a table
  lookup does no matmul FLOPs.
  """
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if exclude_position_embeddings and "pos_embed" in path_names(path):
      continue
    total += int(np.prod(leaf.shape))
  return total


def flops_per_token(cfg, n_params: int, seq_len: Optional[int] = None) -> float:
  """Training FLOPs per token (forward + backward): 6 * N + 6 * L * n_heads * (d_k + d_v) * T.

  With d_v == d_k this is DESIGN.md's 6 * N + 12 * L * n_heads * d_k * T (the PaLM / nanoGPT
  count): 6 FLOPs per parameter per token for the matmuls, plus the score (q.k, d_k) and
  value (p.v, d_v) matmuls over all T keys, unmasked, per query head.

  Args:
    cfg: config with n_layers, n_heads, d_k, d_v (d_v defaults to d_k), block_size.
    n_params: N, parameters without position embeddings (see `count_params`).
    seq_len: T, the attended context length (default cfg.block_size).
  """
  seq_len = cfg.block_size if seq_len is None else seq_len
  d_v = cfg.d_v or cfg.d_k
  attention = 6 * cfg.n_layers * cfg.n_heads * (cfg.d_k + d_v) * seq_len
  return float(6 * n_params + attention)


def mfu(tokens_per_s_per_device: float, flops_per_token: float,
        peak: Optional[float]) -> Optional[float]:
  """Model FLOP utilization in [0, 1]: achieved model FLOP/s over peak; None without a peak."""
  if not peak:
    return None
  return tokens_per_s_per_device * flops_per_token / peak


def bits_per_char(loss_nats: float, chars_per_token: float) -> float:
  """Mean cross-entropy per token in nats -> bits per character of the underlying text."""
  return loss_nats / math.log(2.0) / chars_per_token


def perplexity(loss_nats: float) -> float:
  """exp(mean cross-entropy per token in nats); inf when it overflows."""
  try:
    return math.exp(loss_nats)
  except OverflowError:
    return math.inf


def _to_python(value):
  """A JSON-able scalar: ints stay ints, other numbers (jax, numpy) become floats."""
  if isinstance(value, (bool, str)) or value is None:
    return value
  if isinstance(value, (int, np.integer)):
    return int(value)
  arr = np.asarray(value)
  if arr.size == 1 and np.issubdtype(arr.dtype, np.integer):
    return int(arr)
  return float(arr)


class MetricWriter:
  """Writes metrics to <workdir>/metrics.jsonl, TensorBoard and the console.

  Only the writer with enabled=True writes anything; pass enabled=(jax.process_index() == 0)
  so that one host of a pod records the run. Keys look like "train/loss" or "eval/loss";
  TensorBoard groups them by the part before "/".
  """

  def __init__(self, workdir: str, enabled: bool = True, console: bool = True):
    self.enabled = enabled
    self.console = console
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # Appending keeps the lines of an earlier, resumed part of the same run.
    self._file = open(self.jsonl_path, "a", encoding="utf-8")
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard events, only %s. "
                      "pip install tensorboardX to get them.", self.jsonl_path)
    else:
      self._tb = tensorboardX.SummaryWriter(logdir=self.tensorboard_dir, flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records `metrics` (name -> scalar) at optimizer step `step`."""
    if not self.enabled:
      return
    step = int(step)
    values = {k: _to_python(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": step, **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, global_step=step)
    if self.console:
      parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
      logging.info("step %d | %s", step, " | ".join(parts))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both files; later writes raise, a second close does nothing."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(jsonl_path: str) -> list[dict]:
  """The records of a metrics.jsonl; a line cut short (a killed run) is skipped."""
  records = []
  with open(jsonl_path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _series(records, key):
  pairs = sorted((r["step"], r[key]) for r in records
                 if key in r and isinstance(r[key], (int, float)))
  return [s for s, _ in pairs], [v for _, v in pairs]


def plot_losses(jsonl_path: str, png_path: str) -> str:
  """Plots train and eval loss against step (eval bits/char on a right axis) to a PNG.

  Uses matplotlib's object API with the Agg canvas, so it needs no display and leaves the
  pyplot state alone. Returns png_path.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  records = read_metrics(jsonl_path)
  fig = Figure(figsize=(8, 5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  lines = []
  for key, label, style in ((TRAIN_LOSS, "train loss", "-"), (EVAL_LOSS, "eval loss", "o-")):
    steps, values = _series(records, key)
    if steps:
      lines += ax.plot(steps, values, style, label=label, markersize=3)
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(True, alpha=0.3)
  steps, values = _series(records, EVAL_BPC)
  if steps:
    ax2 = ax.twinx()
    lines += ax2.plot(steps, values, "s--", color="tab:red", label="eval bits/char",
                      markersize=3)
    ax2.set_ylabel("bits per character")
  if lines:
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
  else:
    ax.set_title(f"no loss values in {os.path.basename(jsonl_path)}")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  fig.savefig(png_path, format="png")
  return png_path
