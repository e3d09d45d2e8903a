"""Serving load: requests/s, output tokens/s, time to first token and inter-token latency of
--mode=serve at several concurrencies, with the method and metric names of vLLM's
`benchmark_serving.py` (random dataset, --max-concurrency, request rate inf).

    python bench/serve_load.py --workdir=runs/default              # starts the server itself
    python bench/serve_load.py --workdir=runs/default --serve=serve_slots=16
    python bench/serve_load.py --url=http://127.0.0.1:8000         # a server already running
    python bench/serve_load.py --workdir=runs/default --concurrency=1,4,16,64 --output_len=64

Method. For each concurrency c, --prompts_per_level * c requests (at least 16) are sent as fast
as c in flight allows (a semaphore: vLLM's --max-concurrency with --request-rate inf). Each
request is a streamed /v1/completions of --input_len random token ids (vLLM's random dataset)
and exactly --output_len new tokens (min_tokens = max_tokens: vLLM's ignore_eos), sampled at
temperature 1, with return_token_ids so that every token arrives in a chunk of its own. One
warm-up request precedes each level. The client is asyncio + httpx on the same machine as the
server: on a small CPU host it takes cycles from the server (reported as measured).

Metrics (vLLM's names): request_throughput (completed requests / duration), output_throughput
(output tokens / duration), ttft (request sent -> first token chunk), tpot (per request: (last
- first token) / (output tokens - 1)), itl (every gap between consecutive token chunks of a
request), each as mean, median and p99 in ms. Writes bench/serve_load.json.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(args):
  """main.py --mode=serve on a free port; returns (process, url) once /health answers."""
  port = _free_port()
  flags = [f"--config.{kv}" for kv in args.serve] + [f"--config.serve_port={port}",
                                                     f"--config.serve_max_queue={args.max_queue}"]
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), f"--config={args.config}",
                           f"--workdir={args.workdir}", "--mode=serve", *flags], cwd=ROOT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 600
  while True:
    if proc.poll() is not None:
      sys.exit(f"error: the server exited with {proc.returncode}")
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      pass
    if time.time() > deadline:
      proc.kill()
      sys.exit("error: the server did not answer /health within 600 s")
    time.sleep(0.5)


async def one_request(client, url, model, prompt, output_len):
  """Streams one completion; returns (sent, [arrival time of each token chunk])."""
  body = {"model": model, "prompt": prompt, "max_tokens": output_len, "min_tokens": output_len,
          "temperature": 1.0, "stream": True, "return_token_ids": True}
  arrivals = []
  sent = time.perf_counter()
  async with client.stream("POST", url + "/v1/completions", json=body) as r:
    if r.status_code != 200:
      raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
    async for line in r.aiter_lines():
      if not line.startswith("data: {"):
        continue
      chunk = json.loads(line[6:])
      ids = chunk["choices"][0].get("token_ids") if chunk["choices"] else None
      if ids:
        arrivals.extend([time.perf_counter()] * len(ids))
  return sent, arrivals


def _stats(name, values_s):
  ms = np.asarray(values_s) * 1e3
  return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
          f"p99_{name}_ms": float(np.percentile(ms, 99))}


async def level(url, model, vocab, c, args):
  n = max(16, args.prompts_per_level * c)
  rng = np.random.default_rng(c)
  prompts = [rng.integers(3, vocab, size=args.input_len).tolist() for _ in range(n)]
  limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
  async with httpx.AsyncClient(timeout=600, limits=limits) as client:
    await one_request(client, url, model, prompts[0], args.output_len)  # warm-up
    gate = asyncio.Semaphore(c)

    async def gated(p):
      async with gate:
        return await one_request(client, url, model, p, args.output_len)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(gated(p) for p in prompts))
    duration = time.perf_counter() - t0
  ttft, tpot, itl, out_tokens = [], [], [], 0
  for sent, arrivals in results:
    out_tokens += len(arrivals)
    ttft.append(arrivals[0] - sent)
    if len(arrivals) > 1:
      tpot.append((arrivals[-1] - arrivals[0]) / (len(arrivals) - 1))
      itl.extend(np.diff(arrivals).tolist())
  return {"max_concurrency": c, "completed": len(results), "duration_s": duration,
          "total_input_tokens": n * args.input_len, "total_output_tokens": out_tokens,
          "request_throughput": len(results) / duration, "output_throughput": out_tokens / duration,
          **_stats("ttft", ttft), **_stats("tpot", tpot), **_stats("itl", itl)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--url", help="a running server (else one is started on --workdir)")
  p.add_argument("--workdir", help="the trained model to serve")
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "default.py"))
  p.add_argument("--serve", action="append", default=[],
                 help="a serving field for the started server, e.g. serve_slots=16 (repeatable)")
  p.add_argument("--concurrency", default="1,4,16,64")
  p.add_argument("--prompts_per_level", type=int, default=4)
  p.add_argument("--input_len", type=int, default=16)
  p.add_argument("--output_len", type=int, default=64)
  p.add_argument("--vocab", type=int, default=256,
                 help="random prompt ids are drawn from [3, vocab): keep it within the model's")
  p.add_argument("--max_queue", type=int, default=1024, help="serve_max_queue of the started server")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "serve_load.json"))
  args = p.parse_args()
  if not (args.url or args.workdir):
    p.error("give --url (a running server) or --workdir (a model to serve)")
  proc = None
  if args.url:
    url = args.url.rstrip("/")
  else:
    proc, url = start_server(args)
  try:
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    info = httpx.get(url + "/health", timeout=10).json()
    rows = []
    for c in (int(x) for x in args.concurrency.split(",")):
      row = asyncio.run(level(url, model["id"], args.vocab, c, args))
      rows.append(row)
      print(f"concurrency {c:3d}: {row['request_throughput']:6.2f} req/s  "
            f"{row['output_throughput']:8.1f} out tok/s  ttft p50 {row['median_ttft_ms']:7.1f} "
            f"p99 {row['p99_ttft_ms']:7.1f} ms  itl p50 {row['median_itl_ms']:6.1f} "
            f"p99 {row['p99_itl_ms']:6.1f} ms", flush=True)
  finally:
    if proc is not None:
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=120)
  base = rows[0]
  print("\n| concurrency | req/s | output tok/s | x c=1 | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
        "p99 ITL / c=1's |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['max_concurrency']} | {r['request_throughput']:.2f} | "
          f"{r['output_throughput']:.1f} | {r['output_throughput'] / base['output_throughput']:.1f} | "
          f"{r['median_ttft_ms']:.1f} / {r['p99_ttft_ms']:.1f} | {r['median_itl_ms']:.1f} / "
          f"{r['p99_itl_ms']:.1f} | {r['p99_itl_ms'] / base['p99_itl_ms']:.2f} |")
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"url": url, "model": model, "health_at_start": info, "args": vars(args),
               "levels": rows}, f, indent=1)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
