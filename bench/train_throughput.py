"""Training throughput: tokens/s, step time, MFU and peak memory per config, as a table and JSON.

    python bench/train_throughput.py                                  # small, medium, large
    python bench/train_throughput.py --configs=small --micro_batch_size=32 --steps=20
    python bench/train_throughput.py --tiny                           # CPU smoke run, tiny shapes
    python bench/train_throughput.py --configs=small --set=scan_layers=True --set=remat_policy=dots

Random tokens (the input pipeline is not measured); one optimizer step per measurement with
gradient_accumulation_steps=1 unless --set says otherwise. Timing starts after two warm-up steps
and ends with block_until_ready. MFU uses DESIGN.md's FLOP count and the device peak table in
llm_jax/metrics.py. Targets on one H100 are in DESIGN.md (124M >= 600k tokens/s; 1.3B >= 60% MFU).
"""

import argparse
import ast
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm_jax import config as config_lib  # noqa: E402
from llm_jax import metrics  # noqa: E402
from llm_jax import topology  # noqa: E402
from llm_jax import train  # noqa: E402

TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=512, max_seq_len=64,
            micro_batch_size=4, dtype="float32", use_flash_attention=False)


def measure(name, overrides, steps):
  cfg = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"), **overrides)
  trainer = train.Trainer(cfg, total_steps=cfg.warmup_steps + 1000)  # past warmup: no warning
  state = trainer.init_state(cfg.seed)
  rng = np.random.default_rng(0)
  a, b, t = cfg.gradient_accumulation_steps, cfg.micro_batch_size, cfg.block_size
  seq = rng.integers(0, cfg.vocab_size, size=(a, b, t + 1), dtype=np.int32)
  batch = {"inputs": seq[..., :-1], "targets": seq[..., 1:]}
  t0 = time.perf_counter()
  for _ in range(2):
    state, out = trainer.train_step(state, batch)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, out = trainer.train_step(state, batch)
  jax.block_until_ready((state, out))
  dt = (time.perf_counter() - t0) / steps
  tokens_per_s = cfg.batch_size * cfg.block_size / dt
  n = metrics.count_params(trainer.abstract_params)
  fpt = metrics.flops_per_token(cfg, n)
  m = metrics.mfu(tokens_per_s / jax.device_count(), fpt, metrics.device_peak_flops())
  stats = jax.devices()[0].memory_stats() or {}
  return {"config": name, "params_M": metrics.count_params(trainer.abstract_params, False) / 1e6,
          "batch": cfg.batch_size, "seq": cfg.block_size, "dtype": cfg.dtype,
          "attention": trainer.model_cfg.attention_impl, "step_ms": dt * 1e3,
          "tokens_per_s": tokens_per_s, "mfu": m, "peak_mem_GiB":
          stats.get("peak_bytes_in_use", 0) / 1024**3 or None, "compile_and_warmup_s": compile_s,
          "loss": float(out["loss"]), "device": jax.devices()[0].device_kind,
          "n_devices": jax.device_count(), "overrides": {k: str(v) for k, v in overrides.items()}}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--configs", default="small,medium,large")
  p.add_argument("--micro_batch_size", type=int, default=None)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--set", action="append", default=[], help="field=value override (repeatable)")
  p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run")
  p.add_argument("--out", default="bench/train_throughput.json")
  args = p.parse_args()
  rows = []
  for name in args.configs.split(","):
    overrides = dict(TINY) if args.tiny else {}
    # One micro-batch per step: the config's own micro-batch size unless --micro_batch_size.
    micro = args.micro_batch_size or config_lib.load(
        os.path.join(ROOT, "configs", f"{name}.py"), **overrides).micro_batch_size
    overrides.update(gradient_accumulation_steps=1, batch_size=None, micro_batch_size=micro)
    for kv in args.set:
      k, v = kv.split("=", 1)
      try:
        overrides[k] = ast.literal_eval(v)
      except (ValueError, SyntaxError):
        overrides[k] = v
    rows.append(measure(name, overrides, args.steps))
    r = rows[-1]
    print(f"{r['config']:>8} {r['params_M']:8.1f}M  batch {r['batch']:>3} x {r['seq']:<5} "
          f"{r['dtype']:>8} {r['attention']:>6}  {r['step_ms']:9.1f} ms/step  "
          f"{r['tokens_per_s']:>12,.0f} tok/s  MFU "
          f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%'):>6}  peak mem "
          f"{'n/a' if r['peak_mem_GiB'] is None else format(r['peak_mem_GiB'], '.1f') + ' GiB'}",
          flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  topology.choose_platform()  # before any jax backend starts
  main()
