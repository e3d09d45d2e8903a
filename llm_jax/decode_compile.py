"""The sampler's decode (sampling.py's one jitted prefill + KV-cache decode loop) compiled ahead of
time for a target that is not here (`--mode=compile --config.compile_what=decode`): whether the
params, the cache and the loop's temporaries fit per device, which attention the compiled program
uses, and the HBM-bound floor of one decode step.

The program is exactly `sampling.decode`'s for micro_batch_size prompts of block_size -
max_new_tokens tokens (so the cache holds block_size slots), with the config's sampling knobs,
params placed as `loader.load` places them on the config's mesh. Nothing is allocated.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import errors
from llm_jax import sizing

GIB = sizing.GIB


@dataclasses.dataclass
class DecodeReport:
  target: str
  device_kind: str
  mesh: dict
  batch: int
  prompt_len: int
  new_tokens: int
  attention_impl: str
  attention_note: str
  compile_s: float
  memory: dict
  hbm_bytes: int | None
  hbm_bytes_per_s: float | None
  param_bytes: int  # the compute-dtype copy the loop reads every step, per device
  cache_bytes: int  # the whole KV cache, per device

  @property
  def peak_bytes(self) -> int:
    m = self.memory
    return (m["arguments"] + m["outputs"] - m["aliased (donated, counted once)"]
            + m["temporaries"] + m["generated code"])

  @property
  def fits(self) -> bool | None:
    from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
    return None if self.hbm_bytes is None else self.peak_bytes <= gpu_targets.usable_bytes(
        self.device_kind, self.hbm_bytes)


def compile_decode(cfg, devices=None) -> tuple[DecodeReport, object]:
  """Compiles `sampling.decode` for cfg's target (default: `sizing.target_devices(cfg)`)."""
  from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  from llm_jax import loader  # pylint: disable=g-import-not-at-top
  from llm_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from llm_jax import sampling  # pylint: disable=g-import-not-at-top
  from llm_jax import ring_cache  # pylint: disable=g-import-not-at-top
  from llm_jax import sharding  # pylint: disable=g-import-not-at-top
  from llm_jax import topology  # pylint: disable=g-import-not-at-top
  target = topology.parse_target(cfg.compile_topology) if cfg.compile_topology else None
  if devices is None:
    devices, _ = sizing.target_devices(cfg)
  mesh = sharding.make_mesh(cfg, devices)
  device = mesh.devices.flat[0]
  model_cfg = model_lib.ModelConfig.from_config(cfg, backend=device.platform)
  with gpu_targets.refused_by_cudnn(cfg, devices):  # init traces the attention too
    params, _ = loader.abstract(model_cfg, mesh, sharding.logical_rules(cfg))
  scfg = sampling.SamplingConfig.from_config(cfg, num_beams=1, num_return_sequences=1)
  b, n = cfg.micro_batch_size, scfg.max_new_tokens
  t = cfg.block_size - n
  if t < 1:
    raise errors.UserError(f"compile_what=decode: max_new_tokens={n} leaves no room for a "
                           f"prompt in block_size={cfg.block_size}: lower --config.max_new_tokens")
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = (params, abstract((b, t), jnp.int32), abstract((b, t), jnp.bool_),
          abstract(key.shape, key.dtype), abstract((2,), jnp.int32), abstract((), jnp.float32))
  t0 = time.perf_counter()
  with gpu_targets.refused_by_cudnn(cfg, devices):
    lowered = sampling._decode_jit.trace(  # pylint: disable=protected-access
        *args, model_cfg=model_cfg, scfg=sampling._static(scfg),  # pylint: disable=protected-access
        beam=False).lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  n_dev = mesh.devices.size
  per_device = lambda tree: sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                                for x in jax.tree.leaves(tree)) // n_dev
  low = jax.eval_shape(lambda p: sampling._low_precision_params(p, model_cfg), params)  # pylint: disable=protected-access
  cache = jax.eval_shape(lambda: model_lib.init_cache(  # a window's ring, as the sampler sizes it
      model_cfg, b, ring_cache.length(model_cfg.sliding_window, cfg.block_size)))
  gen = topology.generation_of(device.device_kind) or gpu_targets.by_device_kind(
      device.device_kind)
  hlo = compiled.as_text()
  note = (gpu_targets.attention_verdict(cfg, model_cfg.attention_impl, hlo)
          if device.platform == "gpu" else "")
  report = DecodeReport(
      target=target.describe() if target else f"the {n_dev} present device(s), "
      f"{device.device_kind}", device_kind=device.device_kind, mesh=dict(mesh.shape), batch=b,
      prompt_len=t, new_tokens=n, attention_impl=model_cfg.attention_impl, attention_note=note,
      compile_s=compile_s, memory=sizing._memory(compiled),  # pylint: disable=protected-access
      hbm_bytes=sizing._device_hbm(device),  # pylint: disable=protected-access
      hbm_bytes_per_s=gen.hbm_bytes_per_s if gen else None, param_bytes=int(per_device(low)),
      cache_bytes=int(per_device(cache)))
  return report, compiled


def format_decode_report(cfg, r: DecodeReport) -> str:
  fmt = sizing._fmt_bytes  # pylint: disable=protected-access
  lines = [f"Decode (sampling.decode: prefill + cached decode loop) compiled for {r.target} in "
           f"{r.compile_s:.0f} s",
           f"  mesh {' '.join(f'{k}={v}' for k, v in r.mesh.items())}; {r.batch} prompts x "
           f"{r.prompt_len} tokens + {r.new_tokens} new (cache of {cfg.block_size} slots); "
           f"attention {r.attention_impl}; dtype {cfg.dtype}, params {cfg.param_dtype}"]
  if r.attention_note:
    lines.append(f"  {r.attention_note}")
  lines += ["", "Memory per device (XLA memory analysis)"]
  for k, v in r.memory.items():
    lines.append(f"  {k:<40}{fmt(v)}")
  hbm = f"{r.hbm_bytes / GIB:.2f} GiB" if r.hbm_bytes else "unknown"
  share = f"  ({r.peak_bytes / r.hbm_bytes:.1%} of {hbm} HBM)" if r.hbm_bytes else ""
  lines.append(f"  {'peak (args+outputs-aliased+temps+code)':<40}{fmt(r.peak_bytes)}{share}")
  from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  lines.append("  " + {True: "FITS", False: f"DOES NOT FIT in {hbm} of HBM" + (
      gpu_targets.usable_note(r.hbm_bytes) if gpu_targets.by_device_kind(r.device_kind) else ""),
                       None: f"no HBM figure for {r.device_kind}: nothing to compare against"}[r.fits])
  lines += ["", "Read per decode step, per device (what bounds it at batch "
            f"{r.batch})", f"  {'params in ' + cfg.dtype:<40}{fmt(r.param_bytes)}",
            f"  {'KV cache (all slots)':<40}{fmt(r.cache_bytes)}"]
  if r.hbm_bytes_per_s:
    step = (r.param_bytes + r.cache_bytes) / r.hbm_bytes_per_s
    lines.append(f"  at best {step * 1e6:,.1f} us per step at {r.hbm_bytes_per_s / 1e9:.0f} GB/s "
                 f"= {r.batch / step:,.0f} new tokens/s per device (HBM-bound: every step "
                 f"reads the params and the cache once)")
  return "\n".join(lines)


def run_compile_decode(cfg) -> int:
  """--mode=compile --config.compile_what=decode: prints the report; OK when it fits."""
  try:
    report, _ = compile_decode(cfg)
  except ValueError as e:
    if isinstance(e, errors.UserError):
      raise
    raise errors.UserError(str(e)) from None
  print(format_decode_report(cfg, report), flush=True)
  return sizing.EXIT_DOES_NOT_FIT if report.fits is False else errors.OK
