"""Fine-tuning and quantized sampling: LoRA and QLoRA vs full fine-tuning, int8 / nf4 vs bf16.

    python bench/finetune.py                          # configs/default.py's shape
    python bench/finetune.py --config=configs/small.py --micro_batch_size=8 --prompt_len=128
    python bench/finetune.py --tiny                   # CPU smoke run, tiny shapes

Random parameters and tokens (the base need not be trained to time it). Training rows: one
optimizer step (full fine-tuning, LoRA r=--lora_r on every projection, QLoRA over an nf4 base)
timed over --steps steps after two warm-up steps; memory is XLA's analysis of the compiled step
(arguments + temporaries + outputs - donated aliases: everything the step holds at once), and on
a GPU also the device's peak. Sampling rows: greedy decoding of --new_tokens tokens after a
--prompt_len prompt at --batch, bf16 compute, with the weights in bf16, int8 or nf4; memory is
the parameters' real size (a 4-bit code counts half a byte) and XLA's argument size of the
compiled decode.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import types

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import helpers  # noqa: E402  (tests/helpers.py: random params from shapes, no init compile)
from llm_jax import config as config_lib  # noqa: E402
from llm_jax import loader  # noqa: E402
from llm_jax import model as model_lib  # noqa: E402
from llm_jax import quantize  # noqa: E402
from llm_jax import sampling  # noqa: E402
from llm_jax import sharding  # noqa: E402
from llm_jax import topology  # noqa: E402
from llm_jax import train  # noqa: E402

TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=512, max_seq_len=64,
            micro_batch_size=4)
MiB = 2 ** 20


def _base(cfg):
  mc = dataclasses.replace(model_lib.ModelConfig.from_config(cfg), lora_r=0, quant="")
  mesh = sharding.make_mesh(cfg)
  target, shardings = loader.abstract(mc, mesh, sharding.logical_rules(cfg))
  return jax.device_put(helpers.random_params(target, std=0.02), shardings), mesh


def _memory(compiled):
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)


def train_row(name, cfg, steps):
  params, mesh = _base(cfg)
  if cfg.load_in_4bit:
    mc = model_lib.ModelConfig.from_config(cfg)
    params = loader.quantized(params, mc, mesh, sharding.logical_rules(cfg))
  trainer = train.Trainer(cfg, steps + 10, mesh=mesh, base=types.SimpleNamespace(params=params))
  state = trainer.init_state(0)
  rng = np.random.default_rng(0)
  seq = rng.integers(4, cfg.vocab_size, size=(1, cfg.micro_batch_size, cfg.block_size + 1),
                     dtype=np.int32)
  batch = {"inputs": seq[..., :-1], "targets": seq[..., 1:]}
  for _ in range(2):
    state, out = trainer.train_step(state, batch)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, out = trainer.train_step(state, batch)
  jax.block_until_ready((state, out))
  dt = (time.perf_counter() - t0) / steps
  stats = jax.devices()[0].memory_stats() or {}
  trained = sum(x.size for x in jax.tree.leaves(trainer.abstract_params))
  return {"row": name, "trained_params": trained, "step_ms": dt * 1e3,
          "tokens_per_s": cfg.micro_batch_size * cfg.block_size / dt,
          "xla_step_MiB": _memory(trainer.lower_train_step().compile()) / MiB,
          "device_peak_MiB": stats.get("peak_bytes_in_use", 0) / MiB or None,
          "loss": float(out["loss"])}


def sample_row(name, cfg, quant, batch, prompt_len, new_tokens, repeats):
  params, mesh = _base(cfg)
  mc = dataclasses.replace(model_lib.ModelConfig.from_config(cfg), dtype="bfloat16", quant=quant)
  if quant:
    params = loader.quantized(params, mc, mesh, sharding.logical_rules(cfg))
  else:  # bf16 weights: what quantization is measured against
    params = jax.tree.map(lambda x: x.astype("bfloat16") if x.ndim >= 2 else x, params)
  scfg = sampling.SamplingConfig(max_new_tokens=new_tokens, min_length=new_tokens,
                                 do_sample=False)
  prompt = np.random.default_rng(1).integers(4, cfg.vocab_size, size=(batch, prompt_len),
                                             dtype=np.int32)
  valid = np.ones(prompt.shape, bool)

  def run():
    return sampling.decode(params, prompt, valid, jax.random.key(0), model_cfg=mc, scfg=scfg,
                           eos_id=3)
  jax.block_until_ready(run())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  dt = min(times)
  # pylint: disable=protected-access  (the same jitted program decode runs, lowered)
  lowered = sampling._decode_jit.lower(
      params, prompt, valid, jax.random.key(0), sampling._terminal_ids(3, None),
      np.float32(1.0), model_cfg=mc, scfg=sampling._static(scfg), beam=False)
  return {"row": name, "param_MiB": quantize.param_bytes(params) / MiB,
          "xla_args_MiB": lowered.compile().memory_analysis().argument_size_in_bytes / MiB,
          "new_tokens_per_s": batch * new_tokens / dt, "seconds": dt}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "default.py"))
  p.add_argument("--micro_batch_size", type=int, default=None)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--lora_r", type=int, default=8)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run")
  p.add_argument("--out", default="bench/finetune.json")
  args = p.parse_args()
  common = dict(TINY) if args.tiny else {}
  if args.micro_batch_size:
    common["micro_batch_size"] = args.micro_batch_size
  common.update(gradient_accumulation_steps=1, batch_size=None, use_flash_attention=False,
                warmup_steps=0, quant_group_size=32 if args.tiny else 64)
  lora = dict(init_from="unused", lora_r=args.lora_r, lora_targets="all", lora_dropout=0.0)
  rows = []
  for name, fields in (("full fine-tuning", {}), (f"LoRA r={args.lora_r}", lora),
                       (f"QLoRA r={args.lora_r} (nf4)", dict(lora, load_in_4bit=True))):
    r = train_row(name, config_lib.load(args.config, **common, **fields), args.steps)
    rows.append(r)
    print(f"{name:>22}: {r['trained_params']:>11,} trained params  {r['step_ms']:8.1f} ms/step  "
          f"{r['tokens_per_s']:>9,.0f} tok/s  XLA step memory {r['xla_step_MiB']:8.1f} MiB"
          + (f"  device peak {r['device_peak_MiB']:.0f} MiB" if r["device_peak_MiB"] else ""),
          flush=True)
  cfg = config_lib.load(args.config, **common)
  for name, quant in (("bf16", ""), ("int8", "int8"), ("nf4", "nf4")):
    r = sample_row(name, cfg, quant, args.batch, args.prompt_len, args.new_tokens, args.repeats)
    rows.append(r)
    print(f"{'sampling ' + name:>22}: params {r['param_MiB']:8.2f} MiB (XLA arguments "
          f"{r['xla_args_MiB']:8.2f} MiB)  {r['new_tokens_per_s']:9,.0f} new tok/s at batch "
          f"{args.batch}", flush=True)
  out = {"device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
         "config": args.config, "args": vars(args), "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  topology.choose_platform()  # before any jax backend starts
  main()
