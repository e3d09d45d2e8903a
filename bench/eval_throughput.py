"""Downstream-task throughput: HellaSwag items/s of --mode=tasks' harness against lm-eval's `hf`.

    python bench/eval_throughput.py                                   # 100M-class, 48 items
    python bench/eval_throughput.py --items=96 --lm_eval_batch_sizes=1,8,32,64
    python bench/eval_throughput.py --tiny                            # smoke run, tiny model

Both sides score the same items with the same weights on the same machine:
- The model: a workdir of GPT-2 small's shape (d_model 768, 12 layers, 12 heads, d_ff 3072,
  learned positions, LayerNorm, GELU, tied head; 256 positions) with the default run's
  4096-piece tokenizer, 88.4M parameters, float32, trained for 2 steps (its weights are close to
  the random init: throughput does not depend on them). Made by `main.py` if --workdir has no
  checkpoint, then exported with `--mode=export` to <workdir>/hf (loaded by lm-eval's HFLM).
- The items: --items HellaSwag records (the Hub's fields: activity_label, ctx_a, ctx_b, 4
  endings, label) of about HellaSwag's lengths (ctx_a 20 to 70 words, ctx_b 2 to 8, endings 8
  to 30), spans of consecutive words of the held-out plays, seeded. Written to
  <workdir>/hellaswag_bench.jsonl and rendered by our `hellaswag` task (lm-eval's prompt and
  preprocessing); the 4 x items (context, " " + ending) request strings go to lm-eval.
- Ours: harness.score_task on the prepared task (tokenization, batching, the model, the metric),
  --repeats times in one process; the first run includes the compiles (counted), the best of the
  later ones is the steady state. Once with the shared-context path (the default) and once with
  plain rows (share_context=False).
- lm-eval 0.4's `HFLM` (pretrained=<workdir>/hf, device cpu, float32) in --hf_python (a Python
  with torch, transformers and lm-eval), `loglikelihood` on the same request strings at each of
  --lm_eval_batch_sizes, best of --lm_eval_repeats; its best batch size is the reference. The
  per-request log-likelihoods of the two sides are compared (max |difference| printed).

items/s = items / seconds of one whole pass. Prints a table; writes --out (JSON).
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE = dict(d_model=768, n_heads=12, n_layers=12, d_ff=3072, position_embedding="learned",
             max_seq_len=256, optimizer="adamw", num_train_steps=2, micro_batch_size=4,
             eval_steps=1000, save_steps=2)
TINY = dict(d_model=64, n_heads=4, n_layers=2, d_ff=256, position_embedding="learned",
            max_seq_len=256, optimizer="adamw", num_train_steps=2, micro_batch_size=4,
            eval_steps=1000, save_steps=2)


# ----------------------------------------------------------------------------- lm-eval's side
# (runs in --hf_python: imports nothing of llm_jax or jax)


def hf_side(requests_path: str, hf_dir: str, batch_sizes: str, repeats: int, prefix_id: int,
            out_path: str) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  with open(requests_path, encoding="utf-8") as f:
    pairs = json.load(f)
  rows = []
  lls = None
  for bs in (int(b) for b in batch_sizes.split(",")):
    lm = HFLM(pretrained=hf_dir, backend="causal", device="cpu", dtype="float32", batch_size=bs,
              prefix_token_id=prefix_id)
    times = []
    for _ in range(repeats):
      reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]
      t0 = time.perf_counter()
      res = lm.loglikelihood(reqs, disable_tqdm=True)
      times.append(time.perf_counter() - t0)
    lls = [ll for ll, _ in res]
    rows.append({"batch_size": bs, "seconds": min(times), "all_seconds": times})
    print(f"lm-eval hf batch {bs}: {min(times):.1f}s", flush=True)
    del lm
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump({"rows": rows, "lls": lls, "torch": torch.__version__,
               "torch_threads": torch.get_num_threads()}, f)


# ----------------------------------------------------------------------------- our side


def _words_of_plays() -> list[str]:
  from llm_jax.evals import builtin  # pylint: disable=import-outside-toplevel
  text = " ".join(builtin._plays())  # pylint: disable=protected-access
  return [w for w in re.split(r"\s+", text) if w and not w.endswith(":")]


def write_items(path: str, n: int, seed: int = 0) -> None:
  words, rng = _words_of_plays(), random.Random(seed)

  def span(lo, hi):
    k = rng.randint(lo, hi)
    s = rng.randrange(len(words) - k)
    return " ".join(words[s:s + k])

  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      rec = {"activity_label": span(1, 3).title(), "ctx_a": span(20, 70) + ".",
             "ctx_b": span(2, 8), "endings": [span(8, 30) + "." for _ in range(4)],
             "label": str(i % 4)}
      f.write(json.dumps(rec) + "\n")


def _run(cmd):
  print("$", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def make_model(workdir: str, shape: dict, tokenizer: str | None) -> None:
  ckpts = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpts) or not os.listdir(ckpts):
    cmd = [sys.executable, "main.py", "--config=configs/default.py", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in shape.items()]
    if tokenizer:
      cmd.append(f"--config.tokenizer_path={tokenizer}")
    _run(cmd)
  hf_dir = os.path.join(workdir, "hf")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    _run([sys.executable, "main.py", "--mode=export", f"--workdir={workdir}",
          f"--config.hf_export_dir={hf_dir}"])


def ours(workdir: str, items_path: str, batch_size: int, repeats: int, share: bool) -> dict:
  from llm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from llm_jax import loader  # pylint: disable=import-outside-toplevel
  from llm_jax.evals import engine, harness  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load(os.path.join(ROOT, "configs", "base.py"),
                        tasks=f"hellaswag={items_path}")
  prepared = harness.prepare(cfg)[0]
  loaded = loader.load(workdir, cfg)
  scorer = engine.Scorer(loaded, batch_size=batch_size, progress=False, share_context=share)
  times, result = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    result, recs = harness.score_task(scorer, prepared)
    times.append(time.perf_counter() - t0)
  n = len(prepared.items)
  steady = min(times[1:]) if len(times) > 1 else times[0]
  pairs = [r for it in prepared.items for r in it.requests]
  return {"share_context": share, "batch_size": batch_size, "items": n,
          "first_seconds": times[0], "seconds": steady, "all_seconds": times,
          "items_per_s": n / steady, "first_items_per_s": n / times[0],
          "compiles": scorer.compiles, "acc_norm": result["metrics"]["acc_norm"],
          "lls": [s for r in recs for s in r["scores"]], "pairs": pairs,
          "prefix_id": scorer.prefix_id, "params_M": sum(
              x.size for x in __import__("jax").tree.leaves(loaded.params)) / 1e6}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_eval100m"))
  p.add_argument("--tokenizer", default=None,
                 help="sentencepiece model for a new workdir (default: trained on the spot)")
  p.add_argument("--items", type=int, default=48)
  p.add_argument("--batch_size", type=int, default=32, help="ours: tasks_batch_size")
  p.add_argument("--repeats", type=int, default=3, help="ours: passes (the first compiles)")
  p.add_argument("--lm_eval_batch_sizes", default="4,16,64")
  p.add_argument("--lm_eval_repeats", type=int, default=1)
  p.add_argument("--hf_python", default="/work/main/.venv-hf/bin/python")
  p.add_argument("--no_plain", action="store_true", help="skip ours with share_context=False")
  p.add_argument("--tiny", action="store_true", help="a tiny model: a smoke run")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "eval_throughput.json"))
  p.add_argument("--hf_side", nargs=6, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.hf_side:
    a = args.hf_side
    hf_side(a[0], a[1], a[2], int(a[3]), int(a[4]), a[5])
    return

  sys.path.insert(0, ROOT)
  from llm_jax import topology  # pylint: disable=import-outside-toplevel
  topology.choose_platform()
  workdir = os.path.abspath(args.workdir + ("_tiny" if args.tiny else ""))
  make_model(workdir, TINY if args.tiny else SHAPE, args.tokenizer)
  items_path = os.path.join(workdir, "hellaswag_bench.jsonl")
  write_items(items_path, args.items)
  load = os.getloadavg()

  rows = [ours(workdir, items_path, args.batch_size, args.repeats, True)]
  print(f"ours (shared contexts): {rows[0]['items_per_s']:.2f} items/s "
        f"(first pass {rows[0]['first_items_per_s']:.2f}, {rows[0]['compiles']} compiles)",
        flush=True)
  if not args.no_plain:
    rows.append(ours(workdir, items_path, args.batch_size, args.repeats, False))
    print(f"ours (plain rows): {rows[1]['items_per_s']:.2f} items/s", flush=True)

  req_path = os.path.join(workdir, "bench_requests.json")
  hf_out = os.path.join(workdir, "bench_hf.json")
  with open(req_path, "w", encoding="utf-8") as f:
    json.dump(rows[0]["pairs"], f)
  _run([args.hf_python, os.path.abspath(__file__), "--hf_side", req_path,
        os.path.join(workdir, "hf"), args.lm_eval_batch_sizes, str(args.lm_eval_repeats),
        str(rows[0]["prefix_id"]), hf_out])
  with open(hf_out, encoding="utf-8") as f:
    hf = json.load(f)
  n = args.items
  best = min(hf["rows"], key=lambda r: r["seconds"])
  diff = max(abs(a - b) for a, b in zip(rows[0]["lls"], hf["lls"]))
  load_after = os.getloadavg()

  print(f"\n{rows[0]['params_M']:.1f}M params, {n} HellaSwag-shaped items (4 choices), "
        f"load average {load[0]:.1f} before, {load_after[0]:.1f} after, {os.cpu_count()} CPUs")
  print("| harness | batch | items/s | s/pass | first pass s | compiles |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    name = "llm_jax --mode=tasks" + ("" if r["share_context"] else " (plain rows)")
    print(f"| {name} | {r['batch_size']} | {r['items_per_s']:.2f} | {r['seconds']:.1f} | "
          f"{r['first_seconds']:.1f} | {r['compiles']} |")
  for r in hf["rows"]:
    print(f"| lm-eval hf (torch {hf['torch']}, {hf['torch_threads']} threads) | "
          f"{r['batch_size']} | {n / r['seconds']:.2f} | {r['seconds']:.1f} | | |")
  speedup = rows[0]["items_per_s"] / (n / best["seconds"])
  print(f"speed-up over lm-eval's best (batch {best['batch_size']}): {speedup:.2f}x "
        f"(first pass, compiles included: "
        f"{rows[0]['first_items_per_s'] / (n / best['seconds']):.2f}x); "
        f"max |log-likelihood difference| {diff:.2e}")
  if args.out:
    for r in rows:
      r.pop("pairs")
      r.pop("lls")
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"items": n, "ours": rows, "lm_eval": hf["rows"], "speedup": speedup,
                 "max_ll_diff": diff, "loadavg_before": load, "loadavg_after": load_after,
                 "cpus": os.cpu_count()}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
