"""The compiled HLO of a config's train step, and a profile of a few steps, for holding a real GPU
compile against the deviceless one (`--mode=compile --config.compile_topology=h100`).

    python bench/step_hlo.py --out=results/step                        # configs/small.py here
    python bench/step_hlo.py --out=results/step --target=h100          # deviceless, no GPU needed
    python bench/step_hlo.py --out=results/step --tiny                 # CPU smoke run

Writes OUT/step_hlo_<where>.txt (the optimised HLO), OUT/step_hlo_<where>.json (the custom calls,
fusions and collectives it holds, and XLA's memory analysis) and, on the devices present, a
jax.profiler trace of --steps steps (after two warm-ups) under OUT/profile. The micro batch is
the config's with one accumulation step unless --set says otherwise.
"""

import argparse
import ast
import collections
import json
import os
import re
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm_jax import config as config_lib  # noqa: E402
from llm_jax import sharding  # noqa: E402
from llm_jax import sizing  # noqa: E402
from llm_jax import topology  # noqa: E402
from llm_jax import train  # noqa: E402

TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=512, max_seq_len=64,
            micro_batch_size=4, dtype="float32", use_flash_attention=False)


def summary(hlo_text: str) -> dict:
  """What to compare between two compiles of the same step."""
  calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))
  kinds = collections.Counter(re.findall(r"\bkind=(k\w+)", hlo_text))
  return {"custom_calls": dict(calls), "fusion_kinds": dict(kinds),
          "instructions": sum(1 for ln in hlo_text.splitlines() if " = " in ln),
          "collectives": sizing.collectives(hlo_text)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "small.py"))
  p.add_argument("--target", default="", help="compile_topology to compile for (no run)")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--set", action="append", default=[], help="field=value override (repeatable)")
  p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run")
  p.add_argument("--out", default=os.path.join(ROOT, "results", "step"))
  args = p.parse_args()
  overrides = dict(TINY) if args.tiny else {}
  overrides.update(gradient_accumulation_steps=1, mesh_shape=(1, 1, 1))
  for item in args.set:
    key, _, value = item.partition("=")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  cfg = config_lib.load(args.config, compile_topology=args.target, **overrides)
  devices, _ = sizing.target_devices(cfg)
  trainer = train.Trainer(cfg, total_steps=cfg.warmup_steps + 1000,
                          mesh=sharding.make_mesh(cfg, devices[:1]))
  t0 = time.perf_counter()
  compiled = trainer.lower_train_step().compile()
  compile_s = time.perf_counter() - t0
  where = args.target or devices[0].platform
  os.makedirs(args.out, exist_ok=True)
  text = compiled.as_text()
  with open(os.path.join(args.out, f"step_hlo_{where}.txt"), "w") as f:
    f.write(text)
  info = {"config": args.config, "target": where, "device_kind": devices[0].device_kind,
          "attention": trainer.model_cfg.attention_impl, "compile_s": compile_s,
          "memory": sizing._memory(compiled), "jax": jax.__version__,  # pylint: disable=protected-access
          **summary(text)}
  if not args.target:  # the devices are here: run and profile a few steps
    state = trainer.init_state(cfg.seed)
    b, t = cfg.micro_batch_size, cfg.block_size
    seq = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, b, t + 1), dtype=np.int32)
    batch = {"inputs": seq[..., :-1], "targets": seq[..., 1:]}
    for _ in range(2):
      state, out = trainer.train_step(state, batch)
    jax.block_until_ready(out)
    with jax.profiler.trace(os.path.join(args.out, "profile")):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, out = trainer.train_step(state, batch)
      jax.block_until_ready((state, out))
    info["step_ms"] = (time.perf_counter() - t0) / args.steps * 1e3
    info["peak_mem_GiB"] = ((devices[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
                            / 1024**3 or None)
  with open(os.path.join(args.out, f"step_hlo_{where}.json"), "w") as f:
    json.dump(info, f, indent=2)
  print(json.dumps({k: v for k, v in info.items() if k != "fusion_kinds"}, indent=1))
  return 0


if __name__ == "__main__":
  topology.choose_platform(compile_for_slice=bool(
      [a for a in sys.argv if a.startswith("--target=") and a != "--target="]))
  sys.exit(main())
