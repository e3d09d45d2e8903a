"""Decode throughput: new tokens/s of `sampling.decode`, cached and uncached, as a table and JSON.

    python bench/decode_throughput.py                          # configs/small.py, batch 1 and 32
    python bench/decode_throughput.py --batch_sizes=1,8,32 --prompt_len=128 --new_tokens=256
    python bench/decode_throughput.py --modes=cached --set=use_flash_attention=False
    python bench/decode_throughput.py --tiny                   # CPU smoke run, tiny shapes

Random parameters (init; no training needed) and random prompts of exactly --prompt_len tokens.
Every row generates exactly --new_tokens tokens (min_length = new_tokens keeps EOS away), sampling
with the config's temperature / top-k / top-p unless --greedy. A measurement is one call of the
jitted decode (prefill + the whole decode loop) after a warm-up call that compiles it, ended by
block_until_ready; new tokens/s = batch * new_tokens / seconds (the prefill is included, as in an
end-to-end `generate`). Targets on one H100 for the 124M config (DESIGN.md): >= 3,000 new tok/s
at batch 1 and >= 40,000 at batch 32, cached.
"""

import argparse
import ast
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm_jax import config as config_lib  # noqa: E402
from llm_jax import model as model_lib  # noqa: E402
from llm_jax import sampling  # noqa: E402
from llm_jax import topology  # noqa: E402

TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=512, max_seq_len=64,
            dtype="float32", use_flash_attention=False)


def measure(cfg, model_cfg, params, batch, prompt_len, new_tokens, use_cache, greedy, repeats,
            check_every):
  scfg = sampling.SamplingConfig.from_config(
      cfg, max_new_tokens=new_tokens, min_length=new_tokens, use_cache=use_cache, num_beams=1,
      do_sample=not greedy)
  scfg = dataclasses.replace(scfg, check_every=check_every)
  rng = np.random.default_rng(batch)
  prompt = rng.integers(0, cfg.vocab_size, size=(batch, prompt_len), dtype=np.int32)
  valid = np.ones((batch, prompt_len), bool)
  prompt, valid = jax.device_put((prompt, valid))

  def run(seed):
    return sampling.decode(params, prompt, valid, jax.random.key(seed), model_cfg=model_cfg,
                           scfg=scfg, eos_id=0)

  t0 = time.perf_counter()
  jax.block_until_ready(run(0))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    tokens, lengths, _ = run(i + 1)
    jax.block_until_ready(tokens)
    times.append(time.perf_counter() - t0)
  assert int(np.min(np.asarray(lengths))) == new_tokens, "a row stopped early"
  best = min(times)
  return {"batch": batch, "mode": "cached" if use_cache else "uncached", "prompt_len": prompt_len,
          "new_tokens": new_tokens, "seconds": best, "median_seconds": statistics.median(times),
          "new_tokens_per_s": batch * new_tokens / best, "ms_per_step": best / new_tokens * 1e3,
          "compile_and_first_run_s": compile_s}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "small.py"))
  p.add_argument("--batch_sizes", default="1,32")
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--modes", default="cached,uncached", help="cached, uncached or both")
  p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--check_every", type=int, default=sampling.SamplingConfig.check_every,
                 help="decode steps between all-rows-done checks")
  p.add_argument("--set", action="append", default=[], help="field=value override (repeatable)")
  p.add_argument("--tiny", action="store_true",
                 help="tiny model, batch 1,4, prompt 8, 16 new tokens: a CPU smoke run")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "decode_throughput.json"))
  args = p.parse_args()

  overrides = dict(TINY) if args.tiny else {}
  for item in args.set:
    key, _, value = item.partition("=")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  if args.tiny:
    args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats = "1,4", 8, 16, 2
  cfg = config_lib.load(args.config, **overrides)
  model_cfg = model_lib.ModelConfig.from_config(cfg)
  params = model_lib.init_params(model_cfg, jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))

  rows = []
  for mode in args.modes.split(","):
    for batch in (int(b) for b in args.batch_sizes.split(",")):
      row = measure(cfg, model_cfg, params, batch, args.prompt_len, args.new_tokens,
                    mode == "cached", args.greedy, args.repeats, args.check_every)
      row.update(config=args.config, params_M=n_params / 1e6, dtype=cfg.dtype,
                 attention=model_cfg.attention_impl, device=jax.devices()[0].device_kind,
                 sampling="greedy" if args.greedy else "sample", check_every=args.check_every)
      rows.append(row)
      print(f"{row['mode']:>8} batch {batch:>4}: {row['new_tokens_per_s']:>12,.0f} new tok/s "
            f"({row['ms_per_step']:.3f} ms/step)", flush=True)

  name = os.path.basename(args.config) + (" --tiny" if args.tiny else "")
  print(f"\n{name} ({n_params / 1e6:.1f}M params, {cfg.dtype}, "
        f"{model_cfg.attention_impl} attention) on {jax.devices()[0].device_kind}: prompt "
        f"{args.prompt_len}, {args.new_tokens} new tokens")
  print(f"| {'mode':<8} | {'batch':>5} | {'new tok/s':>12} | {'ms/step':>8} | {'s/call':>8} |")
  print(f"|{'-' * 10}|{'-' * 7}|{'-' * 14}|{'-' * 10}|{'-' * 10}|")
  for r in rows:
    print(f"| {r['mode']:<8} | {r['batch']:>5} | {r['new_tokens_per_s']:>12,.0f} | "
          f"{r['ms_per_step']:>8.3f} | {r['seconds']:>8.3f} |")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"jax": jax.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  topology.choose_platform()  # before any jax backend starts
  main()
