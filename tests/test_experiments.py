"""experiments/: every study at tiny settings, checked against what its outputs claim.

Each study runs once on a tiny text corpus, and the tests read back what it left in --out: the
report's markdown table must have one row per setting with finite numbers; figures.json (the
data read back from each Figure: panels, series, images) must show the panels and series the
report describes, with values compared against independent computations (parameters and FLOPs
counted by hand, numpy SVD / PCA / attention / log-softmax, n-gram counts); the PNGs are those
figures. A rerun must skip finished runs, and an interrupted run must resume to the same result.

Compiles dominate, so the tiny configs make several studies train the very same config (depth's
2-layer run = context's T=16 run = scale's d_model=32 run, and the model the sampling,
embeddings and attention studies read) and a persistent compilation cache turns the repeats
into cache hits. Under pytest-xdist each study runs in one worker (run_once) and the outputs
are shared.
"""

import collections
import dataclasses
import glob
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import matplotlib.image
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

import helpers  # tests/helpers.py
import run_once  # tests/run_once.py

from configs import base as base_config
from configs import default as default_config
from experiments import attention
from experiments import common
from experiments import context
from experiments import depth
from experiments import embeddings
from experiments import finetune
from experiments import sampling
from experiments import scale
from llm_jax import checkpoint
from llm_jax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# No byte fallback: every piece is text (a random model's samples have words), 80 of them.
TINY = dict(vocab_size=80, vocab_multiple=16, byte_fallback=False, d_model=32, n_heads=2, n_layers=2, max_seq_len=16,
            micro_batch_size=4, warmup_steps=0, lr_decay="constant", learning_rate=3e-3,
            sample_every_eval=False, num_train_steps=STEPS, eval_steps=2, save_steps=2,
            log_every=1, prefetch=1, max_new_tokens=15)
WORDS = ("thou art the king of all that moves and breathes upon this earth where sorrow walks "
         "beside the merry fool who laughs at night and sleeps by day").split()
PROMPT = "KING:\nthou art"


# --- fixtures ---------------------------------------------------------------------------------


def _shared_dir(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  def make():
    tmp = _shared_dir(tmp_path_factory) / "experiments"
    r = np.random.default_rng(0)
    for split, n_docs in (("train", 24), ("val", 3)):
      (tmp / "text" / split).mkdir(parents=True)
      for i in range(n_docs):
        lines = [" ".join(r.choice(WORDS, r.integers(4, 10))).capitalize() + "."
                 for _ in range(8)]
        (tmp / "text" / split / f"doc{i:03d}.txt").write_text("KING:\n" + "\n".join(lines)
                                                               + "\n")
    # a downstream task the tiny models can read (the built-in ones outgrow their 16 tokens)
    with open(tmp / "mini_task.jsonl", "w", encoding="utf-8") as f:
      for i in range(6):
        f.write(json.dumps({"context": " ".join(r.choice(WORDS, 4)).capitalize(),
                            "choices": [str(w) for w in r.choice(WORDS, 3, replace=False)],
                            "label": i % 3}) + "\n")
    return str(tmp)
  return pathlib.Path(run_once.once(tmp_path_factory, "experiments_corpus", make))


def _fields(root):
  return dict(TINY, dataset=f"text:{root}/text/train", validation=f"{root}/text/val/*.txt",
              data_dir=str(root / "cache"), tokenizer_path=str(root / "tokenizer.model"),
              tasks=f"mini={root}/mini_task.jsonl")


def _base(root, **overrides):
  cfg = base_config.get_config()
  for k, v in {**_fields(root), **overrides}.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(root):
  """The same program compiled again (another study's identical run, a rerun) is read back."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", str(root / "cache" / "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  cc.reset_cache()
  yield
  for n, v in saved.items():
    jax.config.update(n, v)
  cc.reset_cache()


@dataclasses.dataclass
class Outputs:
  """What a study left in its --out directory."""
  out: pathlib.Path

  @property
  def report(self) -> str:
    return (self.out / "report.md").read_text(encoding="utf-8")

  @property
  def results(self) -> dict:
    return json.loads((self.out / "results.json").read_text(encoding="utf-8"))

  @property
  def rows(self) -> list[dict]:
    return self.results["rows"]

  @property
  def extra(self) -> dict:
    return self.results["extra"]

  def figure(self, name) -> dict:
    return json.loads((self.out / "figures.json").read_text(encoding="utf-8"))[name]


def _study(tmp_path_factory, root, name, run):
  """run(out) once (in one xdist worker); the Outputs it left."""
  out = root / name

  def go():
    run(str(out))
    return str(out)
  return Outputs(pathlib.Path(run_once.once(tmp_path_factory, f"experiments_{name}", go)))


@pytest.fixture(scope="module")
def depth_out(tmp_path_factory, root):
  return _study(tmp_path_factory, root, "depth", lambda out: depth.study(
      _base(root), out, layers=[1, 2], command_line="depth-test"))


@pytest.fixture(scope="module")
def model_dir(depth_out):
  """The 2-layer depth run: the trained model of the sampling, embeddings and attention tests."""
  return str(depth_out.out / "layers_2")


# --- helpers ----------------------------------------------------------------------------------


def _table(report):
  """The first markdown table of a report, as dicts of cell strings."""
  lines = report.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("| "))
  columns = [c.strip() for c in lines[start].strip("|").split("|")]
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append(dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))))
  return rows


def _number(cell):
  return float(cell.replace(",", ""))


def _finite_rows(outputs, n_rows, numeric, first=None):
  """The report's table: n_rows rows whose `numeric` cells (of the first `first` rows, default
  all) are finite numbers."""
  rows = _table(outputs.report)
  assert len(rows) == n_rows, rows
  for r in rows[:first]:
    for c in numeric:
      assert math.isfinite(_number(r[c])), (c, r)
  return rows


def _readable(outputs, name, n_panels, grid_cols=None):
  """The figure has a title, n_panels panels each with a title and axis labels (in a grid of
  grid_cols columns sharing axes: the bottom row's x and the first column's y); its PNG is it
  (same pixel size) and small."""
  fig = outputs.figure(name)
  assert fig["title"] and len(fig["panels"]) == n_panels
  cols = grid_cols or 1
  for i, panel in enumerate(fig["panels"]):
    assert panel["title"]
    if grid_cols is None or i >= n_panels - cols:
      assert panel["xlabel"], panel["title"]
    if grid_cols is None or i % cols == 0:
      assert panel["ylabel"], panel["title"]
  image = matplotlib.image.imread(outputs.out / name)
  assert list(image.shape[1::-1]) == fig["size_px"]
  assert os.path.getsize(outputs.out / name) < 150_000
  return fig["panels"]


def _series(panel, kind="line"):
  return [s for s in panel["series"] if s["kind"] == kind]


def _hand_param_count(d, layers, vocab_padded, d_ff):
  """Tied embedding, LayerNorms with bias, biased projections: counted by hand."""
  attn = 4 * (d * d + d)
  mlp = d * d_ff + d_ff + d_ff * d + d
  return vocab_padded * d + layers * (attn + mlp + 2 * 2 * d) + 2 * d


def _check_task_scores(outputs):
  """Each row's task score is its final checkpoint's accuracy on the mini task (3 choices)
  centred by chance 1/3, and the report's table shows it."""
  for r in outputs.rows:
    (acc,) = r["tasks"].values()
    assert 0 <= acc <= 1 and r["task core"] == pytest.approx((acc - 1 / 3) / (1 - 1 / 3))
  assert "task core" in outputs.report


# --- depth ------------------------------------------------------------------------------------


def test_depth_table_and_figure(depth_out):
  rows = _finite_rows(depth_out, 2, ["n_layers", "params", "eval loss", "bits/char", "wall s",
                                     "s/step", "tokens/s"])
  assert [int(r["n_layers"]) for r in rows] == [1, 2]
  finals = []
  for r in rows:
    assert _number(r["params"]) == _hand_param_count(32, int(r["n_layers"]), 80, 128)
    path = depth_out.out / r["run"] / "metrics.jsonl"
    records = [json.loads(l) for l in path.read_text().splitlines()]
    finals.append([x for x in records if x["step"] == STEPS and "eval/loss" in x][-1])
    assert _number(r["eval loss"]) == pytest.approx(finals[-1]["eval/loss"], rel=1e-3)
  _check_task_scores(depth_out)
  curves, cost, tasks = _readable(depth_out, "depth.png", 3)
  points, _ = _series(tasks)  # and the chance line
  assert points["x"] == [1, 2] and points["y"] == [r["task core"] for r in depth_out.rows]
  lines = _series(curves)
  assert len(lines) == 4  # train and eval per depth
  evals = [l for l in lines if l["label"].endswith("eval")]
  assert [l["x"] for l in evals] == [[2, 4], [2, 4]]
  assert [l["y"][-1] for l in evals] == [f["eval/loss"] for f in finals]
  (points,) = _series(cost)
  assert points["y"] == [f["eval/bits_per_char"] for f in finals]
  assert "\ndepth-test\n" in depth_out.report


def test_depth_rerun_skips_finished_and_resumes_interrupted(depth_out, root, tmp_path, capsys):
  out = tmp_path / "depth"
  shutil.copytree(depth_out.out, out)
  before = {r: (out / r / "metrics.jsonl").stat().st_mtime_ns for r in ("layers_1", "layers_2")}
  again = depth.study(_base(root), str(out), layers=[1, 2])
  assert [r.reused for r in again.runs] == [True, True]
  assert before == {r: (out / r / "metrics.jsonl").stat().st_mtime_ns for r in before}
  assert common.jsonable(again.rows) == depth_out.rows
  # An interrupted run: its final checkpoint never landed. The rerun resumes it from step 2.
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(str(out / "layers_2")), str(STEPS)))
  capsys.readouterr()
  resumed = depth.study(_base(root), str(out), layers=[1, 2])
  assert [r.reused for r in resumed.runs] == [True, False]
  assert "resumed at step 2" in capsys.readouterr().out
  logged = [json.loads(l)["step"] for l in (out / "layers_2" / "metrics.jsonl").open()]
  assert logged.count(STEPS) == 4  # train and eval records, before and after the resume
  # On CPU a resumed run is bitwise the uninterrupted one.
  assert resumed.rows[1]["eval loss"] == depth_out.rows[1]["eval loss"]


# --- context ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def context_out(tmp_path_factory, root):
  return _study(tmp_path_factory, root, "context",
                lambda out: context.study(_base(root), out, seq_lens=[16]))


def test_context_loss_by_position_throughput_memory(context_out):
  rows = _finite_rows(context_out, 1, ["max_seq_len", "micro_batch", "eval loss",
                                       "loss @ pos 0-7", "loss @ last 25%", "tokens/s",
                                       "step peak MiB", "step temp MiB"])
  # One context length (the other shapes of the sweep are test_presets_give_valid_configs's).
  assert [int(r["micro_batch"]) for r in rows] == [4]
  assert all(_number(r["step temp MiB"]) > 0 for r in rows)
  pos, speed, mem = _readable(context_out, "context.png", 3)
  for r, line in zip(rows, _series(pos)):
    t = int(r["max_seq_len"])
    curve = np.asarray(context_out.extra["curves"][str(t)])
    count = np.asarray(context_out.extra["counts"][str(t)])
    assert curve.shape == count.shape == (t,)
    # Plotted: octaves of the tokens seen (1, 2-3, 4-7, 8-16), each its token-weighted mean.
    edges = [(1, 2), (2, 4), (4, 8), (8, 17)]
    assert np.allclose(line["y"], [np.average(curve[a - 1:b - 1], weights=count[a - 1:b - 1])
                                   for a, b in edges])
    assert np.allclose(line["x"], [np.average(np.arange(a, b), weights=count[a - 1:b - 1])
                                   for a, b in edges])
    # The per-position losses weighted by their token counts are the final evaluation
    # (Trainer.evaluate, another code path) over the same split.
    metrics = (context_out.out / r["run"] / "metrics.jsonl").read_text().splitlines()
    final = [json.loads(l) for l in metrics if '"eval/loss"' in l][-1]["eval/loss"]
    assert (curve * count).sum() / count.sum() == pytest.approx(final, rel=1e-5)
    assert _number(r["loss @ pos 0-7"]) == pytest.approx(curve[:8].mean(), rel=1e-3)
  assert len(_series(speed)) == 1 and len(_series(mem)) == 2
  assert _series(mem)[0]["y"] == [context_out.rows[0]["step peak MiB"]]
  assert pos["xscale"] == "log"


# --- scale ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scale_out(tmp_path_factory, root):
  return _study(tmp_path_factory, root, "scale",
                lambda out: scale.study(_base(root), out, d_models=[16, 32], head_dim=16))


def test_scale_counts_flops_and_power_law(scale_out):
  _finite_rows(scale_out, 2, ["d_model", "params", "non-embedding params", "train FLOPs",
                              "eval loss", "bits/char"])
  tokens = STEPS * 4 * 16
  rows = scale_out.rows
  for r in rows:
    d, layers, heads = r["d_model"], r["n_layers"], r["n_heads"]
    assert layers == heads == d // 16
    total = _hand_param_count(d, layers, 80, 4 * d)
    assert r["params"] == total and r["non-embedding params"] == total - 80 * d
    # 6 N per token plus the attention matmuls 6 * L * n_heads * (d_k + d_v) * T.
    want = (6 * total + 6 * layers * heads * (16 + 16) * 16) * tokens
    assert r["train FLOPs"] == pytest.approx(want, rel=1e-12)
  n = [r["non-embedding params"] for r in rows]
  c = [r["train FLOPs"] for r in rows]
  loss = [r["eval loss"] for r in rows]
  alpha = -(math.log(loss[1]) - math.log(loss[0])) / (math.log(n[1]) - math.log(n[0]))
  beta = -(math.log(loss[1]) - math.log(loss[0])) / (math.log(c[1]) - math.log(c[0]))
  fits = scale_out.extra["fits"]
  assert fits["N"][1] == pytest.approx(alpha, rel=1e-6)
  assert fits["C"][1] == pytest.approx(beta, rel=1e-6)
  assert f"N^-{alpha:.4f}" in scale_out.report and f"C^-{beta:.4f}" in scale_out.report
  _check_task_scores(scale_out)
  ax_n, ax_c, ax_t = _readable(scale_out, "scale.png", 3)
  points, _ = _series(ax_t)  # and the chance line
  assert points["x"] == n and points["y"] == [r["task core"] for r in rows]
  assert ax_n["xscale"] == ax_n["yscale"] == ax_c["xscale"] == ax_c["yscale"] == "log"
  points, fit = _series(ax_n)
  assert points["x"] == n and points["y"] == loss
  a, al = fits["N"]
  np.testing.assert_allclose(a * np.asarray(fit["x"]) ** -al, fit["y"], rtol=1e-9)
  np.testing.assert_allclose(a * np.asarray(n, float) ** -al, loss, rtol=1e-6)  # two points
  assert f"{al:.3f}" in fit["label"]
  assert len(_series(ax_c)) == 2 + 2  # a curve per size, the final points, the fit


# --- sampling ---------------------------------------------------------------------------------


def _ngrams(words, n):
  return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


@pytest.fixture(scope="module")
def sampling_out(tmp_path_factory, root, model_dir):
  grid = {"temperature": [0.7, 1.3], "top_k": [5], "top_p": [0.9], "repetition_penalty": [1.3]}
  # 4 samples of 1 + 15 tokens: scored in the [4, 16] shape context's loss by position compiled.
  return _study(tmp_path_factory, root, "sampling", lambda out: sampling.study(
      _base(root), out, grid=grid, samples=4, workdir=model_dir))


def test_sampling_grid_metrics(sampling_out, root, model_dir):
  rows = _finite_rows(sampling_out, 2 + 2, ["temperature", "distinct-1", "distinct-2",
                                            "distinct-3", "repetition rate", "mean length",
                                            "perplexity"], first=2)
  assert [r["decoding"] for r in rows] == ["sample"] * 2 + ["greedy", "held-out text"]
  assert [(r["temperature"], r["top_k"], r["top_p"], r["repetition_penalty"])
          for r in rows[:2]] == [("0.7", "5", "0.9", "1.3"), ("1.3", "5", "0.9", "1.3")]
  samples = [json.loads(l) for l in (sampling_out.out / "samples.jsonl").open()]
  for row, s in zip(sampling_out.rows, samples):
    assert len(s["texts"]) == len(s["ids"]) == (1 if row["decoding"] == "greedy" else 4)
    words = [t.split() for t in s["texts"]]
    grams = [g for w in words for g in _ngrams(w, 2)]
    if grams:
      assert row["distinct-2"] == pytest.approx(len(set(grams)) / len(grams))
    reps = [1 - len(set(_ngrams(w, 2))) / len(_ngrams(w, 2)) for w in words if len(w) >= 2]
    if reps:
      assert row["repetition rate"] == pytest.approx(np.mean(reps))
    assert row["mean length"] == pytest.approx(np.mean([len(i) for i in s["ids"]]))
  # The perplexity of the first setting's samples, from a numpy log-softmax of plain logits.
  loaded = common.load_checkpoint(common.finalize(_base(root)), model_dir)
  s = samples[0]
  seqs = np.zeros((4, 16), np.int32)  # right-padded: causal, so padding changes nothing before it
  for row, (prompt, ids) in enumerate(zip(s["prompts"], s["ids"])):
    seqs[row, :len(prompt + ids)] = prompt + ids
  logits = np.asarray(jax.jit(model_lib.build(loaded.model_cfg).apply)(
      {"params": loaded.params}, seqs), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll, n = 0.0, 0
  for row, (prompt, ids) in enumerate(zip(s["prompts"], s["ids"])):
    picked = logp[row, np.arange(len(prompt + ids) - 1), seqs[row, 1:len(prompt + ids)]]
    nll -= picked[len(prompt) - 1:].sum()
    n += len(ids)
  assert sampling_out.rows[0]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
  quality, repetition = _readable(sampling_out, "sampling.png", 2)
  lines = _series(quality)
  assert [l["label"] for l in lines[-2:]] == ["greedy", "held-out text"]
  assert len(lines) == 1 + 2  # one per filter setting (temperatures joined), 2 references
  assert lines[0]["y"] == [r["distinct-2"] for r in sampling_out.rows[:2]]
  assert [l["x"] for l in _series(repetition)] == [[0.7, 1.3]]
  assert "## Samples" in sampling_out.report


# --- embeddings -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embeddings_out(tmp_path_factory, root, model_dir):
  return _study(tmp_path_factory, root, "embeddings", lambda out: embeddings.study(
      _base(root), out, probe_words=["king", "night", "zzzz"], label_tokens=10,
      workdir=model_dir))


def test_embeddings_spectra_pca_neighbours(embeddings_out, root, model_dir):
  rows = _finite_rows(embeddings_out, 2 * 6 + 1, ["sigma_max", "sigma_max init",
                                                  "effective rank", "stable rank"])
  assert [r["matrix"] for r in rows[:3]] == ["embed", "blocks_0/attn/query", "blocks_0/attn/key"]
  loaded = common.load_checkpoint(common.finalize(_base(root)), model_dir)
  params, tok = loaded.params, loaded.tokenizer
  p = jax.device_get(params)
  by_name = {r["matrix"]: r for r in embeddings_out.rows}
  query = np.asarray(p["blocks_1"]["attn"]["query"]["kernel"], np.float64)  # [D, N, H]
  sv = np.linalg.svd(query.reshape(32, -1), compute_uv=False)
  assert by_name["blocks_1/attn/query"]["sigma_max"] == pytest.approx(sv[0], rel=1e-6)
  out_k = np.asarray(p["blocks_0"]["attn"]["out"]["kernel"], np.float64)  # [N, H, D]
  assert by_name["blocks_0/attn/out"]["sigma_max"] == pytest.approx(
      np.linalg.norm(out_k.reshape(-1, 32), 2), rel=1e-6)
  panels = _readable(embeddings_out, "singular_values.png", 7)
  assert [q["title"] for q in panels] == ["embed", "query", "key", "value", "out", "wi", "wo"]
  q_lines = _series(panels[1])
  assert [l["label"] for l in q_lines] == ["layer 0", "layer 1", "random init (layer 0)"]
  np.testing.assert_allclose(q_lines[1]["y"], sv, rtol=1e-6)
  assert all(q["yscale"] == "log" for q in panels)

  # PCA: the plotted points are the embeddings' first two principal components (numpy
  # eigen-decomposition of the scatter matrix), up to sign.
  (ax,) = _readable(embeddings_out, "embeddings_pca.png", 1)
  scatters = _series(ax, "scatter")
  assert len(scatters) == 4
  pieces = [tok.id_to_piece(i) for i in range(80)]
  usable = np.array([not (q.startswith("<") and q.endswith(">")) for q in pieces])
  assert sum(len(c["points"]) for c in scatters) == usable.sum()
  emb = np.asarray(p["embed"]["embedding"], np.float64)[:80]
  x = emb[usable] - emb[usable].mean(0)
  _, vecs = np.linalg.eigh(x.T @ x)
  want = x @ vecs[:, ::-1][:, :2]
  got = np.asarray(embeddings_out.extra["coords"])[usable]
  for k in range(2):
    assert min(np.abs(got[:, k] - want[:, k]).max(), np.abs(got[:, k] + want[:, k]).max()) < 1e-6

  # Nearest neighbours by cosine similarity, recomputed; a word that is no single piece is named.
  report = embeddings_out.report
  assert "not a single piece in this vocabulary: zzzz" in report
  king = tok.piece_to_id("\u2581king")
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  sims = unit @ unit[king]
  sims[~usable] = -np.inf
  sims[king] = -np.inf
  best = pieces[int(np.argmax(sims))].replace("\u2581", "_")
  line = next(l for l in report.splitlines() if l.startswith("| _king |"))
  assert line.split("|")[2].strip().startswith(best + " ")


# --- attention --------------------------------------------------------------------------------


def _layer_norm(x, scale_, bias, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale_ + bias


def _rope(x_TNH, theta=10000.0):
  h = x_TNH.shape[-1]
  ang = np.arange(x_TNH.shape[0])[:, None, None] * theta ** (-np.arange(0, h, 2) / h)
  x1, x2 = x_TNH[..., :h // 2], x_TNH[..., h // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


@pytest.fixture(scope="module")
def attention_out(tmp_path_factory, root, model_dir):
  return _study(tmp_path_factory, root, "attention", lambda out: attention.study(
      _base(root), out, prompt=PROMPT, workdir=model_dir))


def test_attention_maps_are_the_models_own(attention_out, root, model_dir):
  rows = _finite_rows(attention_out, 2 * 2, ["entropy (nats)", "mean distance",
                                             "previous token", "first token", "self"])
  assert [(int(r["layer"]), int(r["head"])) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  maps = np.asarray(attention_out.extra["maps"])
  labels = attention_out.extra["labels"]
  l, n, t, _ = maps.shape
  assert (l, n) == (2, 2) and len(labels) == t
  np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.triu(maps, 1) == 0)

  # Layer 0 recomputed in numpy from the parameters: embedding, LayerNorm, q/k projections,
  # RoPE, scaled dot products, causal softmax.
  loaded = common.load_checkpoint(common.finalize(_base(root)), model_dir)
  params, tok = loaded.params, loaded.tokenizer
  p = jax.device_get(params)
  ids = [tok.eos_id] + tok.encode(PROMPT)
  assert len(ids) == t
  block = p["blocks_0"]
  x = np.asarray(p["embed"]["embedding"], np.float64)[ids]
  x = _layer_norm(x, block["attn_norm"]["scale"], block["attn_norm"]["bias"])
  att = block["attn"]
  q = _rope(np.einsum("td,dnh->tnh", x, att["query"]["kernel"]) + att["query"]["bias"])
  k = _rope(np.einsum("td,dnh->tnh", x, att["key"]["kernel"]) + att["key"]["bias"])
  scores = np.einsum("tnh,snh->nts", q, k) / math.sqrt(q.shape[-1])
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  want = np.exp(scores - scores.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(maps[0], want, atol=1e-5)

  panels = _readable(attention_out, "attention_maps.png", l * n, grid_cols=n)
  assert attention_out.figure("attention_maps.png")["colorbars"] == 1
  for i, panel in enumerate(panels):
    (image,) = _series(panel, "image")
    np.testing.assert_array_equal(image["data"], maps[i // n, i % n])
    assert panel["title"] == f"layer {i // n}, head {i % n}"
  assert panels[-1]["xticklabels"] == labels and panels[0]["yticklabels"] == labels
  (ax,) = _readable(attention_out, "attention_heads.png", 1)
  assert sum(len(s["x"]) for s in _series(ax)) == l * n


@pytest.fixture(scope="module")
def finetune_out(tmp_path_factory, root, model_dir):
  return _study(tmp_path_factory, root, "finetune", lambda out: finetune.study(
      _base(root), out, data=None, steps=4, eval_steps=2, workdir=model_dir,
      command_line="finetune-test"))


def test_finetune_scratch_full_and_three_loras(finetune_out, model_dir, root):
  _finite_rows(finetune_out, 5, ["trained params", "checkpoint MiB", "eval loss", "bits/char",
                                 "wall s"])
  rows = {r["run"]: r for r in finetune_out.rows}
  assert list(rows) == ["scratch", "full", "lora", "lora+tables", "lora+tokens"]
  # Scratch has the base's architecture and trains all of it, as full fine-tuning does; LoRA
  # trains rank-8 adapters on every projection of 2 layers (d 32, d_ff 128), counted by hand;
  # beside them the whole tied embedding (80 x 32), or the rows of 80 // 16 = 5 tokens.
  assert rows["scratch"]["trained params"] == rows["full"]["trained params"] == (
      checkpoint.param_count(model_dir, STEPS))
  per_layer = 4 * (32 * 8 + 8 * 32) + 2 * (32 * 8 + 8 * 128)  # q, k, v, o; wi, wo
  assert rows["lora"]["trained params"] == 2 * per_layer
  assert rows["lora+tables"]["trained params"] == 2 * per_layer + 80 * 32
  assert rows["lora+tokens"]["trained params"] == 2 * per_layer + 5 * 32
  # The rows are the new text's most frequent tokens: count them independently.
  ids = [int(i) for i in finetune_out.extra["trainable_tokens"].split(",")]
  tok = spm.SentencePieceProcessor(
      model_file=str(finetune_out.out / "lora+tokens" / "tokenizer.model"))
  counts = collections.Counter(
      t for f in sorted(glob.glob(str(finetune_out.out / "data" / "pydoc" / "train" / "*.txt")))
      for t in tok.encode(open(f, encoding="utf-8").read()))
  assert set(ids) == {t for t, _ in counts.most_common(5)}
  # A smaller state saves a smaller checkpoint: LoRA's adapters (with rows or tables, at most
  # 40% of the parameters here) against every weight. (Between the LoRA runs, a few hundred
  # numbers apart, orbax's per-array overhead decides, not the parameters.)
  assert max(rows[m]["checkpoint MiB"] for m in ("lora", "lora+tables", "lora+tokens")) < (
      rows["full"]["checkpoint MiB"])
  # Before any update LoRA's B and the deltas are zero: every fine-tune starts from the base's
  # own score.
  for mode in ("lora", "lora+tables", "lora+tokens"):
    assert rows["full"]["eval loss at step 0"] == pytest.approx(
        rows[mode]["eval loss at step 0"], rel=1e-6)
  assert rows["scratch"]["bits/char at step 0"] is None
  # The new text is Python's documentation, held-out topics for validation.
  assert finetune_out.extra["data"].endswith("/data/pydoc/train")
  assert len(os.listdir(finetune_out.out / "data" / "pydoc" / "val")) == 4
  evals, trains = _readable(finetune_out, "finetune.png", 2)
  assert [s["label"] for s in _series(evals)] == list(rows)
  assert [s["x"][0] for s in _series(evals)] == [2, 0, 0, 0, 0]
  assert all(s["x"][0] == 1 and s["x"][-1] == 4 for s in _series(trains))  # first to last step
  # A rerun trains nothing: every run is finished.
  again = finetune.study(_base(root), str(finetune_out.out), data=None, steps=4, eval_steps=2,
                         workdir=model_dir)
  assert all(r.reused for r in again.runs) and again.rows == finetune_out.rows


# --- the command line and the presets ----------------------------------------------------------


def _main(study, args, root):
  """`python -m experiments.<study> --config=configs/base.py --config.<tiny fields> args`, as a
  user runs it (its own process: the studies' flags are defined by their entry point)."""
  argv = [sys.executable, "-m", f"experiments.{study}", f"--config={ROOT}/configs/base.py",
          *[f"--config.{k}={v}" for k, v in _fields(root).items()], *args]
  return subprocess.run(argv, cwd=ROOT, env=helpers.child_env(), capture_output=True, text=True,
                        timeout=600, check=False)


def test_command_line_report_and_bad_input(root, model_dir, tmp_path):
  out = tmp_path / "attention"
  p = _main("attention", [f"--out={out}", f"--workdir={model_dir}", "--prompt=KING:\\nthou art"],
            root)
  assert p.returncode == 0, p.stderr[-2000:]
  report = (out / "report.md").read_text()
  command = next(l for l in report.splitlines() if l.startswith("python -m experiments."))
  assert command.startswith(f"python -m experiments.attention --config={ROOT}/configs/base.py ")
  assert command.endswith(f" --out={out} --workdir={model_dir} '--prompt=KING:\\nthou art'")
  assert "--config.n_heads=2" in command
  assert re.search(r"- machine: .+, \d+ cores .*jax .* on 1 x cpu", report)
  assert "the prompt 'KING:\\nthou art' after" in report  # --prompt's \n became a newline

  bad = tmp_path / "bad"
  p = _main("depth", [f"--out={bad}", "--config.n_heads=3"], root)
  assert p.returncode == 2 and p.stderr.startswith("error:") and "n_heads=3" in p.stderr, p.stderr
  assert not bad.exists()


def test_bad_study_input_names_the_flag_or_field(root):
  with pytest.raises(common.StudyError, match=r"--layers=1,x: expected int"):
    common.size_list(["1", "x"], (1, 2), "layers")
  with pytest.raises(common.StudyError, match=r"--seq_lens=8,0: every value must be >= 1"):
    common.size_list(["8", "0"], (8,), "seq_lens")
  with pytest.raises(common.StudyError, match=r"n_heads=3 does not divide d_model=32"):
    depth.configs(_base(root, n_heads=3), [1])
  with pytest.raises(common.StudyError, match=r"tokens_per_step=60 is not a multiple of "
                                              r"max_seq_len=16"):
    context.configs(_base(root), [16], tokens_per_step=60)
  with pytest.raises(common.StudyError, match=r"num_train_steps=None"):
    common.finalize(_base(root, num_train_steps=None))


@pytest.mark.parametrize("scale_name", ["cpu", "gpu"])
def test_presets_give_valid_configs(scale_name):
  """Every run each study's presets would start, from configs/default.py (no compile)."""
  def base(preset):
    cfg = ml_collections.ConfigDict(default_config.get_config().to_dict())
    for k, v in preset.items():
      cfg[k] = v
    return cfg

  p = depth.PRESETS[scale_name]
  assert len(depth.configs(base(p["config"]), p["layers"])) == 4
  p = context.PRESETS[scale_name]
  cfgs = context.configs(base(p["config"]), p["seq_lens"])
  assert len({c.micro_batch_size * c.block_size for c in cfgs.values()}) == 1
  p = scale.PRESETS[scale_name]
  cfgs = scale.configs(base(p["config"]), p["d_models"], p["head_dim"])
  assert [c.d_k for c in cfgs.values()] == [p["head_dim"]] * len(cfgs)
  common.finalize(base(common.MODEL_PRESETS[scale_name]))
