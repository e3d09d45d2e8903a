"""The README's GPU table: the real train steps of configs small, medium and large compiled for
one H100, one H200 and 8 H100s (FSDP) from this CPU host (JAX's CUDA plugin, no GPU), with and
without remat, scan_layers off and on: the peak memory per GPU at the config's micro batch, the
largest micro batch that fits, and whether cuDNN fused attention is in the compiled HLO.

    JAX_PLATFORMS=cpu python bench/gpu_table.py --out=results/gpu_table      # needs .[cuda]
    JAX_PLATFORMS=cpu python bench/gpu_table.py --configs=small --targets=h100 --remat=none \
        --scan=False --no-limit                                                # one case

Every case is `sizing.compile_report` of the step `main.py --mode=compile` compiles; the JSON
gives each case's command line. Micro batches are per GPU: on 8xh100 the config's micro batch
times 8 (and its accumulation steps over 8, the same global batch), mesh (1, 8, 1).

The largest micro batch that fits is searched, not swept: the compile-only GPU compiler reports
its memory even past the HBM, and the peak grows about linearly with the micro batch, so after
the config's micro batch the analytic activation estimate's slope (sizing.activation_bytes)
gives the first guess, then the line through the compiled points nearest the limit (once both
exist, the largest that fits and the smallest that does not: regula falsi) the next ones, each
kept inside the known bounds, so a guess that fits is followed by the one above it (about 3-4
compiles a case; the H200's first guess comes from the H100's points). "Fits" is the report's
rule: the peak within 95% of the GPU's memory (gpu_targets.USABLE_FRACTION). Each compile
is appended to OUT/cases.jsonl as it finishes, and a rerun with the same OUT reuses them
(--fresh starts over), so a cut-off run resumes.
"""

import argparse
import gc
import json
import logging
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm_jax import config as config_lib  # noqa: E402
from llm_jax import gpu_targets  # noqa: E402
from llm_jax import metrics  # noqa: E402
from llm_jax import sizing  # noqa: E402
from llm_jax import topology  # noqa: E402

GIB = 1024**3
CONFIGS = ("small", "medium", "large")
TARGETS = ("h100", "h200", "8xh100")
MAX_COMPILES = 6  # per search: the first, then the guesses
XLA_PLAN = gpu_targets.XLA_PLAN_FRACTION  # XLA plans for 80% of a GPU's memory, x 0.95 slop


def _mesh(target: str) -> tuple:
  return (1, 1, 1) if topology.parse_target(target).n_devices == 1 else (1, -1, 1)


def _overrides(name, target, remat, scan, mb):
  """The config fields of one case, mb per GPU."""
  base = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"))
  n = topology.parse_target(target).n_devices
  accum = base.gradient_accumulation_steps
  return dict(compile_topology=target, mesh_shape=_mesh(target), remat_policy=remat,
              scan_layers=scan, micro_batch_size=mb * n,
              gradient_accumulation_steps=accum // n if accum % n == 0 else accum)


def command(name, target, remat, scan, mb) -> str:
  o = _overrides(name, target, remat, scan, mb)
  sets = " ".join(f"--config.{k}='({','.join(map(str, v))})'" if isinstance(v, tuple) else
                  f"--config.{k}={v}" for k, v in o.items())
  return f"JAX_PLATFORMS=cpu python main.py --config=configs/{name}.py --mode=compile {sets}"


def _n_params(cfg) -> int:
  logging.disable(logging.WARNING)  # param_shapes builds the model for the host: its attention
  try:                              # warning is about the CPU, not the target
    return metrics.count_params(sizing.param_shapes(cfg))
  finally:
    logging.disable(logging.NOTSET)


def compile_case(name, target, remat, scan, mb) -> dict:
  """One compile: its figures, or why it did not compile."""
  row = dict(config=name, target=target, remat=remat, scan_layers=scan, micro_batch=mb,
             command=command(name, target, remat, scan, mb))
  try:
    cfg = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"),
                          **_overrides(name, target, remat, scan, mb))
    t0 = time.perf_counter()
    r, compiled = sizing.compile_report(cfg)
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    calls = gpu_targets.cudnn_attention_calls(compiled.as_text()) if compiled is not None else []
    row.update(
        device_kind=r.device_kind, mesh=r.mesh, attention_impl=r.attention_impl,
        use_flash_attention=bool(cfg.use_flash_attention), cudnn_calls=calls,
        attention_note=r.attention_note, memory=r.memory, peak_bytes=r.peak_bytes,
        hbm_bytes=r.hbm_bytes, fits=r.fits, oom=r.oom,
        n_params=_n_params(cfg),
        collectives={k: v for k, v in r.collectives.items() if v[0]})
    del compiled
  except Exception as e:  # pylint: disable=broad-except  (recorded: the table says why)
    row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:600])
  gc.collect()
  return row


class Cache:
  """cases.jsonl under OUT: one line per compile, read back on a rerun."""

  def __init__(self, path, fresh, cached_only=False):
    self.path, self.rows, self.cached_only = path, {}, cached_only
    if fresh and os.path.exists(path):
      os.remove(path)
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          row = json.loads(line)
          self.rows[self.key(row["config"], row["target"], row["remat"], row["scan_layers"],
                             row["micro_batch"])] = row

  @staticmethod
  def key(*args):
    return "|".join(map(str, args))

  def get(self, name, target, remat, scan, mb, verbose=True):
    k = self.key(name, target, remat, scan, mb)
    if k not in self.rows and self.cached_only:
      return dict(config=name, target=target, remat=remat, scan_layers=scan, micro_batch=mb,
                  command=command(name, target, remat, scan, mb), error="not compiled yet",
                  missing=True)
    if k not in self.rows:
      t0 = time.time()
      row = compile_case(name, target, remat, scan, mb)
      self.rows[k] = row
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
      if verbose:
        peak = f"{row['peak_bytes'] / GIB:.2f} GiB" if row.get("peak_bytes") else "-"
        print(f"  compiled {k}: peak {peak} fits {row.get('fits')} "
              f"{row.get('error', '')} ({time.time() - t0:.0f} s)", flush=True)
    return self.rows[k]


def _fits(row) -> bool:
  """The report's rule (sizing.CompileReport.fits), recomputed: rows of an earlier rule agree."""
  if row.get("oom"):
    return False
  return row["peak_bytes"] <= gpu_targets.usable_bytes(row["device_kind"], row["hbm_bytes"])


def _peak(row):
  return row.get("peak_bytes") if not row.get("error") and not row.get("oom") else None


def activation_slope(name, remat) -> float:
  """Bytes per GPU per extra sequence of micro batch: sizing.activation_bytes' estimate (the
  search's first guess, before two compiles give a line)."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  one, two = (sizing.activation_bytes(config_lib.load(path, micro_batch_size=m, remat_policy=remat))
              for m in (1, 2))
  return float(two - one)


def search_limit(cache, name, target, remat, scan, mb0, seed_points=(),
                 max_compiles=MAX_COMPILES, slope_hint=None, first=None) -> dict:
  """The largest micro batch per GPU that fits (`fits`), the smallest that does not (`stops`),
  from a secant search between known bounds; `points` every (mb, peak GiB) compiled."""
  gpu = topology.parse_target(target).gpu
  hbm = gpu_targets.usable_bytes(gpu.device_kind, gpu.hbm_bytes)  # the line aims at this
  pts = {}  # mb -> peak bytes, this target's compiles
  lo, hi = 0, None  # lo fits (0: nothing known), hi does not

  tried = set()

  def run(mb):
    nonlocal lo, hi
    tried.add(mb)
    row = cache.get(name, target, remat, scan, mb)
    peak = _peak(row)
    if peak is None and not row.get("oom"):
      return row  # an error: stop
    if peak is not None:
      pts[mb] = peak
    if _fits(row):
      lo = max(lo, mb)
    else:
      hi = mb if hi is None else min(hi, mb)
    return row

  def guess():
    line = sorted({**dict(seed_points), **pts}.items())
    if len(line) < 2:
      return None
    # The line through the bounds once both are known (regula falsi), else through the two
    # points nearest the HBM.
    if lo in pts and hi in pts:
      (m1, p1), (m2, p2) = (lo, pts[lo]), (hi, pts[hi])
    else:
      (m1, p1), (m2, p2) = sorted(line, key=lambda mp: abs(mp[1] - hbm))[:2]
    if m1 == m2 or p1 == p2:
      return None
    slope = (p2 - p1) / (m2 - m1)
    return math.floor(m1 + (hbm - p1) / slope) if slope > 0 else None

  # What earlier runs compiled for this case counts (a resumed search goes on from there).
  known = [r["micro_batch"] for r in cache.rows.values() if (
      r["config"], r["target"], r["remat"], r["scan_layers"]) == (name, target, remat, scan)]
  for mb in sorted(known):
    run(mb)
  first = first or mb0
  compiles = lambda: len(tried - set(known))
  row = run(first)
  if row.get("error"):
    return dict(error=row["error"])
  while compiles() < max_compiles:
    if hi is not None and hi <= lo + 1:
      break
    g = guess()
    if g is None and slope_hint and first in pts:  # one point: the slope given
      g = math.floor(first + (hbm - pts[first]) / slope_hint)
    if g is None:  # no line: double, or halve when the config's micro batch does not fit
      g = 2 * mb0 if lo >= mb0 else max(1, mb0 // 2)
    # Inside the bounds, so never a micro batch already compiled; a guess that fits is followed
    # by the one above it, one that does not by the one below.
    g = max(g, lo + 1) if hi is None else min(max(g, lo + 1), hi - 1)
    if run(g).get("error"):  # (or, --cached-only, not compiled yet: the search stops there)
      break
  return dict(fits=lo, stops=hi, points=sorted((m, round(p / GIB, 2)) for m, p in pts.items()))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--targets", default=",".join(TARGETS))
  p.add_argument("--remat", default="none,full")
  p.add_argument("--scan", default="False,True")
  p.add_argument("--no-limit", action="store_true",
                 help="only the config's micro batch, no search for the largest that fits")
  p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_table"))
  p.add_argument("--fresh", action="store_true", help="forget OUT/cases.jsonl")
  p.add_argument("--max-compiles", type=int, default=MAX_COMPILES,
                 help="per search for the largest micro batch that fits")
  p.add_argument("--h200-at-config-mb", action="store_true",
                 help="compile the H200 at the config's micro batch too (default: its search "
                      "starts at the H100 line's guess, the row borrows the H100's compile)")
  p.add_argument("--cached-only", action="store_true",
                 help="compile nothing: the table of what OUT/cases.jsonl holds")
  args = p.parse_args()
  if gpu_targets.installed_plugin() is None:
    print(f"error: {gpu_targets.install_hint()}", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  cache = Cache(os.path.join(args.out, "cases.jsonl"), args.fresh, args.cached_only)
  scans = [s.strip() == "True" for s in args.scan.split(",")]
  results = []
  for name in args.configs.split(","):
    mb0 = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py")).micro_batch_size
    for remat in args.remat.split(","):
      for scan in scans:
        for target in args.targets.split(","):
          print(f"{name} {target} remat={remat} scan_layers={scan}", flush=True)
          # The same variant's H100 compiles: the H200 (the H100's compute with more memory)
          # starts from their line, 8xh100 from their slope (the activations per GPU).
          h100 = sorted((r["micro_batch"], r["peak_bytes"]) for r in cache.rows.values()
                        if (r["config"], r["target"], r["remat"], r["scan_layers"]) ==
                        (name, "h100", remat, scan) and _peak(r))
          seed, slope, first = [], activation_slope(name, remat), mb0
          if len(h100) >= 2 and target != "h100":
            slope = (h100[-1][1] - h100[0][1]) / (h100[-1][0] - h100[0][0])
            at_mb0 = dict(h100).get(mb0)
            if target == "h200":
              seed = h100
              # Borrow the H100's compile at the config's micro batch only where it is below
              # what XLA plans for on the H100 (beyond, XLA rematerialises for that limit).
              if not args.h200_at_config_mb and at_mb0 and at_mb0 < XLA_PLAN * gpu_targets.GPUS[
                  "h100"].hbm_bytes:
                gpu = gpu_targets.GPUS["h200"]
                m, peak = h100[-1]
                first = max(1, math.floor(m + (gpu_targets.usable_bytes(
                    gpu.device_kind, gpu.hbm_bytes) - peak) / slope))
          lim = ({} if args.no_limit else
                 search_limit(cache, name, target, remat, scan, mb0, seed, args.max_compiles,
                              slope, first))
          if lim and not lim.get("error"):  # the bounds from every compile of this case
            rows = [r for r in cache.rows.values() if (r["config"], r["target"], r["remat"],
                    r["scan_layers"]) == (name, target, remat, scan) and not r.get("error")]
            fit = [r["micro_batch"] for r in rows if _fits(r)]
            over = [r["micro_batch"] for r in rows if not _fits(r)]
            lim = dict(fits=max(fit, default=0), stops=min(over, default=None),
                       points=sorted((r["micro_batch"], round(r["peak_bytes"] / GIB, 2))
                                     for r in rows if _peak(r)))
          key = cache.key(name, target, remat, scan, mb0)
          if key not in cache.rows and first != mb0 and cache.key(
              name, "h100", remat, scan, mb0) in cache.rows:
            # Below XLA's own memory plan the H200's program is the H100's (checked on small:
            # the same peak): its row at the config's micro batch is the H100's compile.
            row = dict(cache.rows[cache.key(name, "h100", remat, scan, mb0)], target=target,
                       borrowed="h100", hbm_bytes=gpu_targets.GPUS["h200"].hbm_bytes,
                       device_kind=gpu_targets.GPUS["h200"].device_kind)
          else:
            row = cache.get(name, target, remat, scan, mb0)
          results.append(dict(row, limit=lim, command=command(name, target, remat, scan, mb0),
                              **({} if row.get("error") else
                                                  {"fits": _fits(row)})))
  n_params = {r["config"]: r["n_params"] for r in cache.rows.values() if r.get("n_params")}
  for r in results:
    r.setdefault("n_params", n_params.get(r["config"], 0))
  table = markdown(results)
  print("\n" + table)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "table.json"), "w") as f:
    json.dump({"jax": sizing._versions(), "cases": results}, f, indent=1)  # pylint: disable=protected-access
  print(json.dumps([{k: r.get(k) for k in ("config", "target", "remat", "scan_layers",
                                            "micro_batch", "peak_bytes", "fits", "limit",
                                            "cudnn_calls", "error")} for r in results]))
  return 0


def _attention(row) -> str:
  if row.get("error") or row.get("oom"):
    return "-"
  calls = row.get("cudnn_calls") or []
  if calls:
    return "cuDNN fwd+bwd" if any("Backward" in c for c in calls) else "cuDNN fwd only"
  return "XLA" + (" (asked for cuDNN!)" if row.get("use_flash_attention") else "")


def markdown(results) -> str:
  lines = ["| config | target (mesh) | remat | scan_layers | micro batch / GPU | peak / GPU | "
           "fits | largest micro batch / GPU that fits (next: peak) | attention | compile |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  missing = []
  for r in results:
    mesh = "1 GPU" if topology.parse_target(r["target"]).n_devices == 1 else "FSDP 8"
    head = (f"| {r['config']} ({r.get('n_params', 0) / 1e6:,.0f}M) | {r['target']} ({mesh}) | "
            f"{r['remat']} | {r['scan_layers']} | {r['micro_batch']}"
            f"{' (h100 compile)' if r.get('borrowed') else ''} | ")
    if r.get("missing"):
      missing.append(f"{r['config']} {r['target']} remat={r['remat']} scan_layers="
                     f"{r['scan_layers']}")
      continue
    if r.get("error"):
      lines.append(head + f"does not compile: {r['error'][:160]} | no | - | - | - |")
      continue
    hbm = r["hbm_bytes"] / GIB
    peak = f"{r['peak_bytes'] / GIB:.1f} GiB ({r['peak_bytes'] / r['hbm_bytes']:.0%})" if (
        r.get("peak_bytes")) else "compiler: out of memory"
    lim = r.get("limit") or {}
    if lim.get("error"):
      limit = "not searched (time budget)" if lim["error"] == "not compiled yet" else "-"
    elif lim:
      pts = dict(lim["points"])
      nxt = (f" ({lim['stops']}: {pts[lim['stops']]:.1f} GiB)" if lim.get("stops") in pts
             else "")
      found = lim["stops"] is not None and lim["stops"] == lim["fits"] + 1
      limit = (("none fits" if lim["fits"] == 0 else f"**{lim['fits']}**") + nxt if found else
               f">= {lim['fits']}" + (f", < {lim['stops']}" if lim["stops"] else "")
               + " (search budget)")
    else:
      limit = "-"
    lines.append(head + f"{peak} of {hbm:.1f} | {'yes' if r['fits'] else 'NO'} | {limit} | "
                 f"{_attention(r)} | {r['compile_s']:.0f} s |")
  if missing:
    lines += ["", f"Not compiled yet ({len(missing)} cases; run the script again with the same "
              f"--out): " + "; ".join(missing) + "."]
  return "\n".join(lines)


if __name__ == "__main__":
  topology.choose_platform(compile_for_slice=True)
  sys.exit(main())
