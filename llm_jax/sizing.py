"""Parameter, memory and FLOP estimates before anything is allocated (`--mode=estimate`), and
the ahead-of-time compile of the real train step that says whether a run fits (`--mode=compile`).

The parameter count is exact: it comes from `jax.eval_shape` of the model's init. Memory is given
twice: the parameter reference's three rough formulas, as the sheet writes them, beside our byte
count of params + gradients + optimizer state + activations, so the difference is visible.

`compile_report` compiles the train step a run would execute (the same Trainer, mesh, rules,
accumulation, remat and attention kernel) for the present devices or, from any host with libtpu,
for a TPU slice that is not here (topology.py), or, with JAX's CUDA plugin, for NVIDIA GPUs
(gpu_targets.py), and reads back what XLA decided: bytes per device against the chip's HBM,
FLOPs beside the analytic count, the collectives in the compiled HLO and, on GPUs, whether
cuDNN fused attention is in it. Nothing is allocated and nothing runs. (The sampler's decode:
decode_compile.py.)
"""

import dataclasses
import math
import os
import pickle
import re
import time

import jax
import numpy as np

from llm_jax import errors
from llm_jax import metrics
from llm_jax import model as model_lib

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3


def param_shapes(cfg):
  """Abstract params (ShapeDtypeStructs) of the model `cfg` describes; nothing is allocated.

  Traced with the blocks under nn.scan (one leading layer axis): the same shapes and counts, at
  a cost that does not grow with n_layers (unrolled, 200 layers took 23 s to trace; scanned
  0.2 s), so an estimate of any depth answers at once.
  """
  mcfg = dataclasses.replace(model_lib.ModelConfig.from_config(cfg), scan_layers=True)
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


def _fmt_bytes(b: float) -> str:
  return f"{b / GIB:10.3f} GiB" if b >= 0.01 * GIB else f"{b / 1024**2:10.2f} MiB"


def report(cfg, est: Estimate) -> str:
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
  return "\n".join(lines)


# ----------------------------------------------------------------- Ahead-of-time compile

EXIT_DOES_NOT_FIT = errors.OOM  # --mode=compile's exit code when the step does not fit
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass
class CompileReport:
  """What XLA decided for one train step, per device (see `compile_report`)."""
  target: str  # what it was compiled for, in words
  n_devices: int
  device_kind: str
  mesh: dict  # axis -> size
  attention_impl: str
  compile_s: float
  memory: dict  # XLA memory analysis in bytes; empty when the compiler ran out of memory
  hbm_bytes: int | None  # per device; None where unknown (CPU)
  oom: str | None  # the compiler's out-of-memory message
  flops_xla: float | None  # XLA cost analysis per optimizer step; None where not comparable
  flops_note: str  # how flops_xla was scaled, or why it is missing
  flops_model: float  # 6N + attention per optimizer step
  bytes_accessed: float | None  # XLA's HBM traffic estimate per optimizer step
  hbm_bytes_per_s: float | None
  peak_flops: float | None  # dense bf16 FLOP/s per device
  collectives: dict  # kind -> [count, bytes] per optimizer step
  tokens_per_step: int  # per device
  attention_note: str = ""  # GPUs: whether the compiled program uses cuDNN fused attention

  @property
  def peak_bytes(self) -> int | None:
    if not self.memory:
      return None
    m = self.memory
    return (m["arguments"] + m["outputs"] - m["aliased (donated, counted once)"]
            + m["temporaries"] + m["generated code"])

  @property
  def fits(self) -> bool | None:
    """The peak within the HBM; on a GPU target within what JAX can have of it
    (gpu_targets.usable_bytes)."""
    from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
    if self.oom:
      return False
    if self.hbm_bytes is None:
      return None
    return self.peak_bytes <= gpu_targets.usable_bytes(self.device_kind, self.hbm_bytes)

  @property
  def step_time(self) -> tuple[float, float | None] | None:
    """(seconds at the chip's peak FLOP/s, seconds at its HBM bandwidth); None without a peak."""
    if not self.peak_flops:
      return None
    compute = (self.flops_xla or self.flops_model) / self.peak_flops
    memory = (self.bytes_accessed / self.hbm_bytes_per_s
              if self.bytes_accessed and self.hbm_bytes_per_s else None)
    return compute, memory


# --- Collectives in compiled HLO text. The TPU compiler clones an async collective into the
# fusions that start and finish it (same channel_id: counted once) and writes a reduce-scatter as
# an all-reduce inside an "all-reduce-scatter" fusion. Ops inside while loops (scans over
# micro-batches or layers) count once per iteration, the trip count read from the loop condition.
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8\w*)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_BITS = {"pred": 8, "bf16": 16}


def _array_bytes(type_text: str) -> int:
  sizes = []
  for dtype, dims in _ARRAY.findall(type_text):
    bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
    sizes.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
  return sum(sizes)


def _start_parts(type_text: str) -> tuple[str, str]:
  """(operands, results) of an async collective's start type: "(operand, result)", or, for the
  GPU compiler's combined collectives, "((operands...), results...)"."""
  text = type_text.strip()
  text = text[1:text.rindex(")")] if text.startswith("(") else text
  depth = 0
  for i, ch in enumerate(text):
    depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      return text[:i], text[i + 1:]
  return text, text


def _group_size(line: str) -> int:
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'(\w+)'", m.group(2)))
  return 1


def collectives(hlo_text: str) -> dict:
  """{kind: [count, bytes]} of the collectives one execution of compiled HLO runs, per device.

  bytes: the whole buffer each one gathers or reduces on a device (all-gather: its result;
  reduce-scatter and all-reduce: their input), summed over executions.
  """
  comps, order = {}, []
  current = None
  for line in hlo_text.splitlines():
    h = _HEADER.match(line)
    if h:
      current = h.group(1)
      comps[current] = []
      order.append((current, line.startswith("ENTRY")))
    elif current is not None and line.startswith(" "):
      comps[current].append(line)
  entry = next((n for n, is_entry in order if is_entry), None)

  def trip_count(cond: str) -> int:
    lines = comps.get(cond, [])
    consts = [int(c) for ln in lines for c in re.findall(r"\bs32\[\]\S*\s+constant\((\d+)\)", ln)]
    root = next((ln for ln in lines if "ROOT" in ln), "")
    return consts[0] if len(consts) == 1 and "direction=LT" in root else 1

  calls = {n: [] for n in comps}  # caller -> [(callee, executions per call)]
  for name, lines in comps.items():
    for ln in lines:
      body = re.search(r"\bbody=%?([\w.\-]+)", ln)
      if body and " while(" in ln:
        cond = re.search(r"\bcondition=%?([\w.\-]+)", ln)
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', ln)  # the GPU compiler's note
        calls[name].append((body.group(1), int(known.group(1)) if known else
                            trip_count(cond.group(1)) if cond else 1))
      callees = _CALLS.findall(ln) + [c.strip().lstrip("%") for group in _CALL_LISTS.findall(ln)
                                      for c in group.split(",") if c.strip()]
      calls[name] += [(c, 1) for c in callees if c in comps]

  mult = dict.fromkeys(comps, 0)
  if entry:
    stack = [(entry, 1)]
    while stack:  # the call graph is a DAG; paths multiply, call sites add
      name, m = stack.pop()
      mult[name] += m
      stack += [(c, m * f) for c, f in calls[name]]

  seen, out = {}, {k: [0, 0] for k in COLLECTIVES}
  for name, lines in comps.items():
    for ln in lines:
      i = _INSTR.match(ln)
      op = _OP.search(i.group(2)) if i else None
      if not op:
        continue
      kind = op.group(1).removesuffix("-start")
      if kind not in COLLECTIVES or op.group(1).endswith("-done"):
        continue
      type_text = i.group(2)[:op.start()]
      if op.group(1).endswith("-start"):
        operands, results = _start_parts(type_text)
        nbytes = _array_bytes(operands if kind == "reduce-scatter" else results)
      else:
        nbytes = _array_bytes(type_text)
        if kind == "reduce-scatter":
          nbytes *= _group_size(ln)
      if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"
      channel = re.search(r"channel_id=(\d+)", ln)
      key = (kind, channel.group(1)) if channel else (kind, name, i.group(1))
      prev = seen.get(key, (0, 0))
      seen[key] = (max(prev[0], mult[name]), max(prev[1], nbytes))
  for (kind, *_), (m, nbytes) in seen.items():
    out[kind][0] += m
    out[kind][1] += m * nbytes
  return out


# --- The compile itself.


def target_devices(cfg):
  """(devices, target): cfg.compile_topology's compile-only devices and what they are (a
  topology.Slice, one slice per dcn_mesh_shape entry's product; or a gpu_targets.Target), or
  (the devices present, None) when it is unset."""
  from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  from llm_jax import topology  # pylint: disable=g-import-not-at-top
  if not cfg.compile_topology:
    return jax.devices(), None
  target = topology.parse_target(cfg.compile_topology)
  if isinstance(target, gpu_targets.Target):
    return gpu_targets.devices(target), target
  return topology.devices(target, num_slices=math.prod(cfg.dcn_mesh_shape)), target


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  get = lambda f: int(getattr(m, f, 0) or 0)
  return {"arguments": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
          "aliased (donated, counted once)": get("alias_size_in_bytes"),
          "temporaries": get("temp_size_in_bytes"),
          "generated code": get("generated_code_size_in_bytes")}


def _device_hbm(device) -> int | None:
  """HBM per device: the TPU table or the GPU target's spec, else what the runtime reports
  (GPUs); None for CPUs."""
  from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  from llm_jax import topology  # pylint: disable=g-import-not-at-top
  kind = topology.generation_of(device.device_kind) or gpu_targets.by_device_kind(
      device.device_kind)
  if kind is not None:
    return kind.hbm_bytes
  if device.platform == "cpu":
    return None
  try:
    return int((device.memory_stats() or {}).get("bytes_limit")) or None
  except Exception:  # pylint: disable=broad-except  (compile-only devices have no stats)
    return None


def compile_report(cfg, devices=None) -> tuple[CompileReport, object]:
  """Compiles the train step of `cfg` for `devices` (default: `target_devices(cfg)`).

  Returns (report, compiled executable or None when the compiler ran out of memory). Raises
  ValueError (a mesh that does not divide the devices) and topology.TopologyError before compiling.
  """
  from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  from llm_jax import sharding  # pylint: disable=g-import-not-at-top
  from llm_jax import topology  # pylint: disable=g-import-not-at-top
  from llm_jax import train  # pylint: disable=g-import-not-at-top  (train imports sizing's neighbours)
  slice_ = topology.parse_target(cfg.compile_topology) if cfg.compile_topology else None
  if devices is None:
    devices, _ = target_devices(cfg)
  mesh = sharding.make_mesh(cfg, devices)
  t0 = time.perf_counter()
  compiled, oom = None, None
  with gpu_targets.refused_by_cudnn(cfg, devices):  # model init and the step trace attention
    trainer = train.Trainer(cfg, total_steps=cfg.warmup_steps + 1, mesh=mesh)
    lowered = trainer.lower_train_step()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if not train.is_oom(e):
      raise
    oom = str(e).splitlines()[0]
  compile_s = time.perf_counter() - t0

  device = mesh.devices.flat[0]
  n = mesh.devices.size
  gen = topology.generation_of(device.device_kind)
  gpu = gpu_targets.by_device_kind(device.device_kind)
  accum = cfg.gradient_accumulation_steps
  multisteps = cfg.grad_accum == "multisteps" and accum > 1
  n_params = metrics.count_params(trainer.abstract_params)
  tokens = cfg.batch_size * cfg.block_size // n
  flops_xla = bytes_accessed = None
  note = ""
  if compiled is not None:
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if gpu is not None and not cost:  # a compile-only GPU executable has no cost analysis
      cost, note = _gpu_cost(cfg, lowered, compiled.as_text(), n)
    if cfg.scan_layers:
      note = ("not comparable with scan_layers=True: XLA counts a loop's body once, so one "
              "layer of the scan; the step time below uses the analytic count")
    elif "flops" in cost:
      # XLA counts a loop's body once: the accumulation scan's A micro-batches appear as one
      # (the optimizer update, counted A times instead of once, is a few FLOPs per parameter).
      flops_xla = float(cost["flops"]) * accum
      bytes_accessed = float(cost.get("bytes accessed", 0.0)) * accum or None
      if accum > 1:
        note = ", ".join(filter(None, [note, (
            f"x {accum}: one program call per micro-batch" if multisteps else
            f"x {accum}: XLA counts the accumulation loop's body once")]))
  colls, attention_note = {}, ""
  if compiled is not None:
    hlo_text = compiled.as_text()
    colls = collectives(hlo_text)
    if device.platform == "gpu":
      attention_note = gpu_targets.attention_verdict(cfg, trainer.model_cfg.attention_impl,
                                                     hlo_text)
    if multisteps:
      colls = {k: [c * accum, b * accum] for k, (c, b) in colls.items()}
  target = (slice_.describe() + (f", x{math.prod(cfg.dcn_mesh_shape)} slices"
                                 if math.prod(cfg.dcn_mesh_shape) > 1 and gpu is None else "")
            if slice_ else f"the {n} present device(s), {device.device_kind}")
  report = CompileReport(
      target=target, n_devices=n, device_kind=device.device_kind, mesh=dict(mesh.shape),
      attention_impl=trainer.model_cfg.attention_impl, compile_s=compile_s,
      memory=_memory(compiled) if compiled is not None else {}, hbm_bytes=_device_hbm(device),
      oom=oom, flops_xla=flops_xla, flops_note=note,
      flops_model=metrics.flops_per_token(cfg, n_params) * tokens,
      bytes_accessed=bytes_accessed,
      hbm_bytes_per_s=(gen or gpu).hbm_bytes_per_s if (gen or gpu) else None,
      peak_flops=metrics.peak_flops_per_device(device.device_kind), collectives=colls,
      tokens_per_step=tokens, attention_note=attention_note)
  return report, compiled


def _gpu_cost(cfg, lowered, hlo_text, n_devices) -> tuple[dict, str]:
  """({"flops": per device, one micro-batch}, how counted) for a compile-only GPU program:
  XLA's count of the program before optimisation (gpu_targets.preopt_cost) over the devices,
  plus, when the compiled HLO has cuDNN attention, its FLOPs by 6N + attention's formula (before
  optimisation it is a custom call, or under a mesh a custom-partitioning call: both count zero)."""
  from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  flops = float(gpu_targets.preopt_cost(lowered).get("flops", 0.0))
  note = "XLA's count of the program before optimisation (none after, without a GPU)"
  if gpu_targets.cudnn_attention_calls(hlo_text):
    flops += (metrics.flops_per_token(cfg, 0) * cfg.micro_batch_size * cfg.block_size)
    note += " + cuDNN attention by formula (its recompute under remat not counted)"
  return {"flops": flops / n_devices}, note


def format_report(cfg, r: CompileReport) -> str:
  """The report `--mode=compile` prints."""
  from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  from llm_jax import topology  # pylint: disable=g-import-not-at-top
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  accum = (f"{cfg.micro_batch_size} x {cfg.gradient_accumulation_steps} accumulation steps "
           f"({cfg.grad_accum})" if cfg.gradient_accumulation_steps > 1 else
           f"{cfg.micro_batch_size}")
  lines = [f"Train step compiled for {r.target} in {r.compile_s:.0f} s",
           f"  mesh {' '.join(f'{k}={v}' for k, v in r.mesh.items())}; batch {accum} x "
           f"{cfg.block_size} tokens; attention {r.attention_impl}; remat {cfg.remat_policy}; "
           f"scan_layers {cfg.scan_layers}; dtype {cfg.dtype}, params {cfg.param_dtype}"]
  if r.attention_note:
    lines.append(f"  {r.attention_note}")
  lines.append("")
  hbm = f"{r.hbm_bytes / GIB:.2f} GiB" if r.hbm_bytes else "unknown"
  if r.oom:
    lines += [f"DOES NOT FIT in {hbm} of HBM per device. The compiler says:", f"  {r.oom}"]
  else:
    lines.append("Memory per device (XLA memory analysis)")
    for k, v in r.memory.items():
      lines.append(f"  {k:<40}{_fmt_bytes(v)}")
    share = f"  ({r.peak_bytes / r.hbm_bytes:.1%} of {hbm} HBM)" if r.hbm_bytes else ""
    lines.append(f"  {'peak (args+outputs-aliased+temps+code)':<40}"
                 f"{_fmt_bytes(r.peak_bytes)}{share}")
    verdict = {True: "FITS", False: f"DOES NOT FIT in {hbm} of HBM",
               None: f"no HBM figure for {r.device_kind}: nothing to compare against"}[r.fits]
    if r.fits is False and gpu_targets.by_device_kind(r.device_kind):
      verdict += gpu_targets.usable_note(r.hbm_bytes)
    if r.fits is False and topology.generation_of(r.device_kind):
      verdict += (" (the TPU compiler accepted the program, so it is at the very edge: expect "
                  "an out-of-memory error when it loads or runs)")
    lines.append(f"  {verdict}")
    if r.fits and gpu_targets.by_device_kind(r.device_kind):
      lines.append(gpu_memory_caveat(r.peak_bytes, r.hbm_bytes))
  if r.fits is False:
    lines.append(f"  Try: {train.OOM_FIXES}.")
  if r.oom:
    lines.append(f"  Analytic FLOPs per device per optimizer step (6N + attention): "
                 f"{r.flops_model:.3e}")
    return "\n".join(lines)

  lines += ["", f"FLOPs per device per optimizer step ({r.tokens_per_step:,} tokens per device)",
            f"  {'XLA cost analysis':<40}" + (f"{r.flops_xla:10.3e}" if r.flops_xla else
                                              f"{'-':>10}")
            + (f"  ({r.flops_note})" if r.flops_note else ""),
            f"  {'model: 6N + attention':<40}{r.flops_model:10.3e}"
            + (f"  ({r.flops_model / r.flops_xla:.0%} of XLA's)" if r.flops_xla else "")]
  lines += ["", "Collectives per device per optimizer step (compiled HLO; ops in loops counted "
            "per iteration)"]
  for kind in COLLECTIVES:
    count, nbytes = r.collectives.get(kind, (0, 0))
    lines.append(f"  {kind:<22}{count:>8,} ops{_fmt_bytes(nbytes) if count else '':>16}")
  t = r.step_time
  if t is None:
    lines += ["", f"Step time: no peak FLOP/s known for {r.device_kind}"]
  else:
    compute, memory = t
    step = max(compute, memory or 0.0)
    fmt = lambda s: f"{s:10.3f} s" if s >= 1 else f"{s * 1e3:10.2f} ms"
    source = "XLA" if r.flops_xla else "model"
    lines += ["", f"Step time at the chip's peak ({r.peak_flops / 1e12:.0f} TFLOP/s bf16"
              + (f", {r.hbm_bytes_per_s / 1e9:.0f} GB/s HBM" if r.hbm_bytes_per_s else "") + ")",
              f"  {f'compute-bound ({source} FLOPs / peak)':<40}{fmt(compute)}",
              f"  {'HBM-bound (XLA bytes accessed / bandwidth)':<40}"
              + (fmt(memory) if memory else f"{'-':>10}"),
              f"  at best {fmt(step).strip()} per step = {r.tokens_per_step / step:,.0f} tokens/s "
              f"per device (every collective hidden behind compute)"
              + (f", MFU {r.flops_model / (step * r.peak_flops):.0%} at most" if r.flops_xla else
                 "; the MFU bound needs XLA's count (scan_layers=False)")]
  return "\n".join(lines)


def gpu_memory_caveat(peak_bytes: int, hbm_bytes: int) -> str:
  """What a GPU target's memory figure leaves out, and JAX's default share of the GPU."""
  from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  share = ("; above the 75% of GPU memory JAX preallocates by default: run with "
           "XLA_PYTHON_CLIENT_MEM_FRACTION=.95" if peak_bytes > 0.75 * hbm_bytes else "")
  plan = ("; above XLA's own memory plan for this GPU "
          f"({gpu_targets.XLA_PLAN_FRACTION:.0%} of it), so XLA rematerialises what it can "
          "(recomputes values instead of keeping them: a slower step than with room)"
          if peak_bytes > gpu_targets.XLA_PLAN_FRACTION * hbm_bytes else "")
  return (f"  (compile-only: no cuDNN workspace or autotuned GEMM tiles in the figure{share}{plan})")


def _versions() -> dict:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for pkg in ("jax", "jaxlib", "libtpu"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  return out


def save_executable(compiled, path: str, target: str) -> None:
  """Writes the compiled train step (jax.experimental.serialize_executable) with the versions
  it needs; `load_executable` reads it back on the pod."""
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump({"versions": _versions(), "target": target, "executable": payload,
                 "in_tree": in_tree, "out_tree": out_tree}, f)


def load_executable(path: str, backend: str | None = None):
  """The train step `save_executable` wrote, loaded on this host's devices (same jax, jaxlib
  and libtpu versions, same topology): call it as trainer._train_step would be called."""
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    saved = pickle.load(f)
  if saved["versions"] != _versions():
    raise errors.UserError(f"{path} was compiled with {saved['versions']}, this host has "
                           f"{_versions()}: compile it again here (--mode=compile)")
  return serialize_executable.deserialize_and_load(saved["executable"], saved["in_tree"],
                                                   saved["out_tree"], backend=backend)


def run_compile(cfg) -> int:
  """--mode=compile: prints the report; OK when it fits, EXIT_DOES_NOT_FIT when not (bad input
  raises errors.UserError: main.py exits BAD_INPUT)."""
  if cfg.compile_what == "decode":
    from llm_jax import decode_compile  # pylint: disable=g-import-not-at-top
    return decode_compile.run_compile_decode(cfg)
  try:
    report_, compiled = compile_report(cfg)
  except ValueError as e:  # e.g. a mesh the slice's devices cannot form
    if isinstance(e, errors.UserError):
      raise
    raise errors.UserError(str(e)) from None
  print(format_report(cfg, report_), flush=True)
  if compiled is not None and cfg.compile_save:
    save_executable(compiled, cfg.compile_save, report_.target)
    print(f"\nsaved the compiled step to {cfg.compile_save} (loads with sizing.load_executable "
          f"under the same jax/jaxlib/libtpu: {_versions()})", flush=True)
  return EXIT_DOES_NOT_FIT if report_.fits is False else errors.OK
