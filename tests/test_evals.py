"""--mode=tasks scores as lm-evaluation-harness scores, with lm-eval itself as the reference.

lm-eval's own task definitions (its installed YAML and utils.py, pointed at local files in the
Hub's field names) build the requests and compute the metrics; ours must give the same request
strings (0- and 2-shot), and, on one tiny model (random weights, nothing trained), the same
per-item log-likelihoods and the same metrics as lm-eval's `simple_evaluate` running the same
model through our lm-eval backend, which lets lm-eval tokenize the pairs and cut the rolling
windows itself. The token log-likelihoods are checked against a plain forward pass.
"""

import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers  # tests/helpers.py
import run_once  # tests/run_once.py

from llm_jax import checkpoint
from llm_jax import config
from llm_jax import data as data_lib
from llm_jax import sharding
from llm_jax import train

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra: the reference")

from llm_jax.evals import tasks as tasks_lib  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import main  # pylint: disable=g-import-not-at-top,wrong-import-position

BASE = os.path.join(ROOT, "configs", "base.py")
LM_TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TINY = dict(vocab_size=128, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
            n_layers=2, max_seq_len=64, position_embedding="learned", micro_batch_size=4,
            num_train_steps=8, eval_steps=0, sample_every_eval=False)
# our task name -> (lm-eval YAML under lm_eval/tasks, the splits its YAML reads)
YAMLS = {"hellaswag": ("hellaswag/hellaswag.yaml", ("train", "validation")),
         "arc_easy": ("arc/arc_easy.yaml", ("train", "validation", "test")),
         "piqa": ("piqa/piqa.yaml", ("train", "validation")),
         "winogrande": ("winogrande/default.yaml", ("train", "validation")),
         "copa": ("super_glue/copa/default.yaml", ("train", "validation")),
         "boolq": ("super_glue/boolq/default.yaml", ("train", "validation")),
         "sciq": ("sciq/sciq.yaml", ("train", "validation", "test")),
         "openbookqa": ("openbookqa/openbookqa.yaml", ("train", "validation", "test")),
         "lambada_openai": ("lambada/lambada_openai.yaml", ("test",)),
         "wikitext": ("wikitext/wikitext.yaml", ("train", "validation", "test")),
         "gsm8k": ("gsm8k/gsm8k.yaml", ("train", "test"))}


def _words(rng, n):
  syl = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ba", "de", "fo", "gu"]
  return " ".join("".join(rng.choice(syl, size=rng.integers(1, 4))) for _ in range(n))


def _records(name, rng, n=6):
  """n records of task `name` in its Hub dataset's fields, pseudo-words the tokenizer knows."""
  w = lambda k: _words(rng, k)
  out = []
  for i in range(n):
    if name == "hellaswag":
      r = {"activity_label": w(1).capitalize(), "ctx_a": w(6) + " [title] " + w(2) + ".",
           "ctx_b": w(2), "endings": [w(int(rng.integers(1, 6))) + " [step] " + w(1)
                                      for _ in range(4)], "label": str(i % 4)}
    elif name in ("arc_easy", "openbookqa"):
      labels = ["A", "B", "C", "D"][:3 + i % 2]
      r = {"question" if name == "arc_easy" else "question_stem": w(5) + "?",
           "choices": {"text": [w(int(rng.integers(1, 4))) for _ in labels], "label": labels},
           "answerKey": labels[i % len(labels)]}
    elif name == "piqa":
      r = {"goal": w(5), "sol1": w(3), "sol2": w(4), "label": i % 2}
    elif name == "winogrande":
      r = {"sentence": f"{w(3).capitalize()} _ {w(4)}.", "option1": w(1), "option2": w(1),
           "answer": str(1 + i % 2)}
    elif name == "copa":
      r = {"premise": w(4).capitalize() + ".", "choice1": w(3).capitalize() + ".",
           "choice2": w(3).capitalize() + ".", "question": ("cause", "effect")[i % 2],
           "label": i % 2}
    elif name == "boolq":
      r = {"passage": w(8) + ".", "question": w(4), "label": i % 2}
    elif name == "sciq":
      r = {"support": " " + w(6) + ".", "question": w(4) + "?", "distractor1": w(1),
           "distractor2": w(2), "distractor3": w(1), "correct_answer": w(2)}
    elif name == "lambada_openai":
      r = {"text": w(int(rng.integers(8, 30)))}
    elif name == "gsm8k":
      r = {"question": w(6) + "?", "answer": f"{w(4)}.\n#### {int(rng.integers(1, 99))}"}
    else:  # wikitext pages, some longer than the 64-token context: rolling windows
      r = {"page": " = " + w(2) + " = \n " + w(int(rng.integers(10, 120))) + " , " + w(5) + " . \n"}
    out.append(r)
  return out


def _make_fixture(root):
  """A tiny workdir (random params, as training saves them), local task files in the Hub's
  fields, and lm-eval YAMLs that include lm-eval's own task configs over those files."""
  helpers.write_corpus(os.path.join(root, "text"))
  fields = {**TINY, "dataset": f"text:{root}/text/train", "validation": f"{root}/text/val/*.txt",
            "data_dir": os.path.join(root, "data")}
  cfg = config.load(BASE, **fields)
  workdir = os.path.join(root, "run")
  data = data_lib.build(cfg, workdir, 0, 1)
  trainer = train.Trainer(cfg, cfg.num_train_steps, mesh=sharding.make_mesh(cfg, jax.devices()[:1]))
  # a large std: far from uniform predictions, so acc and acc_norm differ between choices
  params = helpers.random_params(trainer.abstract_params, seed=1, std=0.5)
  state = train.TrainState(step=jnp.asarray(4, jnp.int32), params=params,
                           opt_state=trainer.tx.init(params), rng=jax.random.key(0))
  ckpt = checkpoint.Checkpointer(workdir, cfg, data.steps_per_epoch,
                                 os.path.join(workdir, "tokenizer.model"))
  try:
    ckpt.save(4, state, data.train_iter())
  finally:
    ckpt.close()
  rng = np.random.default_rng(0)
  tasks_dir, yaml_dir = os.path.join(root, "tasks"), os.path.join(root, "yaml")
  hub_dir = os.path.join(root, "hub")
  os.makedirs(tasks_dir)
  os.makedirs(yaml_dir)
  os.environ["HF_DATASETS_CACHE"] = os.path.join(root, "hf_datasets")
  import datasets  # pylint: disable=import-outside-toplevel
  for name, (yaml, splits) in YAMLS.items():
    files = {}
    for split in splits:
      files[split] = os.path.join(tasks_dir, f"{name}.{split}.jsonl")
      with open(files[split], "w", encoding="utf-8") as f:
        for r in _records(name, rng):
          f.write(json.dumps(r) + "\n")
    with open(os.path.join(yaml_dir, f"{name}_local.yaml"), "w", encoding="utf-8") as f:
      f.write(f"include: {os.path.join(LM_TASKS, yaml)}\ntask: {name}_local\n"
              f"dataset_path: json\ndataset_name: null\n"
              f"dataset_kwargs: {{data_files: {json.dumps(files)}}}\n")
    # the same splits as users keep a Hub dataset: datasets' save_to_disk folder, found by name
    datasets.load_dataset("json", data_files=files).save_to_disk(os.path.join(hub_dir, name))
  return {"workdir": workdir, "fields": fields, "tasks_dir": tasks_dir, "yaml_dir": yaml_dir,
          "hub_dir": hub_dir}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
  return run_once.once(tmp_path_factory, "evals_fixture",
                       lambda: _make_fixture(str(tmp_path_factory.mktemp("evals"))))


@pytest.fixture(scope="module")
def lm_tasks(fx, tmp_path_factory):
  """lm-eval's Task objects over the local files (datasets' cache kept in the test's tmp)."""
  os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets"))
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  from lm_eval.tasks import TaskManager, get_task_dict  # pylint: disable=import-outside-toplevel
  tm = TaskManager(include_path=fx["yaml_dir"], include_defaults=False)
  return tm, get_task_dict([f"{n}_local" for n in YAMLS], tm)


def _ours(fx, name, shots):
  """Our items of task `name`, found by name in the folder of save_to_disk datasets."""
  task, items, pool, _ = tasks_lib.load(name, None, fx["hub_dir"])
  tasks_lib.build(task, items, pool, shots)
  return items


@pytest.mark.parametrize("shots", [0, 2])
def test_requests_are_lm_evals_own(fx, lm_tasks, shots):
  """Every task's request strings (context, continuation) equal those lm-eval's own task
  definition builds from the same records, few-shot examples (seed 1234) included."""
  _, tasks = lm_tasks
  for name in YAMLS:
    t = tasks[f"{name}_local"]
    t.set_config(key="num_fewshot", value=0 if name == "wikitext" else shots)
    t.set_fewshot_seed(1234)
    t.build_all_requests(rank=0, world_size=1)
    ref = [i.args for i in sorted(t.instances, key=lambda i: (i.doc_id, i.idx))]
    if name == "gsm8k":  # generation: (context, generation kwargs); ours are the contexts
      ref = [(a[0],) for a in ref]
    got = [r if isinstance(r, tuple) else (r,) for it in _ours(fx, name, shots)
           for r in it.requests]
    assert got == ref, name


@pytest.fixture
def cli(capfd, monkeypatch):
  monkeypatch.setattr(main, "_honour_omp_num_threads", lambda: None)
  monkeypatch.setattr(main, "_enable_compilation_cache", lambda cfg: None)

  def call(*args):
    capfd.readouterr()
    code = main.cli(["main.py", *args])
    out, err = capfd.readouterr()
    return code, out + err
  return call


def test_mode_tasks_scores_equal_lm_evals_simple_evaluate(fx, lm_tasks, cli):
  """--mode=tasks (1-shot) and lm-eval's simple_evaluate over the backend on the same model:
  the same per-item log-likelihoods (1e-4) and the same metrics, for multiple choice, partial
  scoring, cloze and rolling perplexity; and the report holds what the issue asks."""
  from llm_jax.evals import lm_eval_backend  # pylint: disable=import-outside-toplevel
  names = ("hellaswag", "arc_easy", "winogrande", "copa", "lambada_openai", "wikitext")
  flags = [f"--config={BASE}"] + [f"--config.{k}={v}" for k, v in fx["fields"].items()]
  code, out = cli("--mode=tasks", f"--workdir={fx['workdir']}", *flags,
                  f"--config.tasks={','.join(names)}", f"--config.tasks_dir={fx['hub_dir']}",
                  "--config.num_fewshot=1", "--config.tasks_batch_size=8")
  assert code == 0, out[-3000:]
  out_dir = os.path.join(fx["workdir"], "tasks", "step_4")
  with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
    report = json.load(f)

  tm, tasks = lm_tasks
  lm = lm_eval_backend.LlmJaxLM(fx["workdir"], config=config.load(BASE, **fx["fields"]),
                                batch_size=8)
  ref = lm_eval.simple_evaluate(model=lm, tasks=[f"{n}_local" for n in names], num_fewshot=1,
                                task_manager=tm, log_samples=True, bootstrap_iters=0,
                                fewshot_random_seed=1234)
  for name in names:
    ours, theirs = report["tasks"][name]["metrics"], ref["results"][f"{name}_local"]
    assert ours, name
    for metric, value in ours.items():
      assert theirs[f"{metric},none"] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, metric)
    with open(os.path.join(out_dir, f"{name}.jsonl"), encoding="utf-8") as f:
      items = [json.loads(line) for line in f]
    samples = sorted(ref["samples"][f"{name}_local"], key=lambda s: s["doc_id"])
    assert len(items) == len(samples)
    for item, s in zip(items, samples):
      lls = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s["resps"]]
      mine = item.get("scores") or [item["ll"]]
      np.testing.assert_allclose(mine, lls, atol=1e-4, err_msg=name)

  # the report: chance levels, centred scores, their mean, the step
  r = report["tasks"]
  assert r["arc_easy"]["chance"] == pytest.approx(np.mean([1 / (3 + i % 2) for i in range(6)]))
  assert r["copa"]["chance"] == 0.5 and r["lambada_openai"]["chance"] == 0.0
  assert r["wikitext"]["chance"] is None  # a perplexity is not centred
  centred = [(t["metrics"][t["headline"]] - t["chance"]) / (1 - t["chance"])
             for t in r.values() if t["chance"] is not None]
  assert report["core"] == pytest.approx(np.mean(centred))
  assert report["step"] == 4 and report["truncated"] > 0  # the wikitext pages, 1-shot contexts


def test_scorer_log_likelihoods_equal_a_plain_forward_pass(fx):
  """engine.Scorer's batched, bucketed, right-padded rows give each request the summed
  log-probabilities of a plain forward pass over its own tokens; a request longer than the
  context is cut from the left (lm-eval's HFLM rows); one compile per bucket shape."""
  from llm_jax import loader  # pylint: disable=import-outside-toplevel
  from llm_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from llm_jax.evals import engine  # pylint: disable=import-outside-toplevel
  loaded = loader.load(fx["workdir"], config.load(BASE, **fx["fields"]))
  scorer = engine.Scorer(loaded, batch_size=4, progress=False)
  rng = np.random.default_rng(3)
  pairs = [(rng.integers(3, 128, size=n).tolist(), rng.integers(3, 128, size=m).tolist())
           for n, m in ((1, 1), (5, 3), (20, 7), (40, 30), (90, 10), (63, 1), (2, 64))]
  got = scorer.score_tokens(pairs)
  fwd = jax.jit(model_lib.build(loaded.model_cfg).apply)
  for (ctx, cont), (ll, greedy) in zip(pairs, got):
    whole = (ctx + cont)[-(scorer.max_length + 1):]
    logits = np.asarray(fwd({"params": loaded.params}, jnp.asarray([whole[:-1]])), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None] \
        - logits.max(-1, keepdims=True)
    rows = np.arange(len(whole) - 1 - len(cont), len(whole) - 1)
    targets = np.asarray(whole[1:])[rows]
    assert ll == pytest.approx(logp[rows, targets].sum(), abs=1e-4)
    assert greedy == bool((logits[rows].argmax(-1) == targets).all())
  assert scorer.truncated == 3  # (40, 30), (90, 10) and (2, 64): more than 65 tokens
  # fixed shapes: batch_size rows of a power-of-two length (capped at the context), and jit
  # compiled exactly the shapes counted
  assert scorer.shapes <= {(4, 16), (4, 32), (4, 64)}
  assert scorer._score._cache_size() == scorer.compiles == 2  # pylint: disable=protected-access


def test_shared_contexts_score_as_plain_rows(fx):
  """Each context run once on its KV cache for all its continuations (engine.score_shared) gives
  every request the plain rows' log-likelihood and greedy flag: groups of 2 to 5 choices, contexts
  of 1 to 60 tokens, one-token continuations, and requests cut from the left (plain rows)."""
  from llm_jax import loader  # pylint: disable=import-outside-toplevel
  from llm_jax.evals import engine  # pylint: disable=import-outside-toplevel
  loaded = loader.load(fx["workdir"], config.load(BASE, **fx["fields"]))
  scorer = engine.Scorer(loaded, batch_size=8, progress=False)
  rng = np.random.default_rng(5)
  pairs = []
  for n, j in ((1, 2), (7, 4), (20, 4), (33, 5), (60, 3), (12, 4), (3, 1), (50, 4)):
    ctx = rng.integers(3, 128, size=n).tolist()
    for _ in range(j):
      pairs.append((ctx, rng.integers(3, 128, size=int(rng.integers(1, 20))).tolist()))
  order = rng.permutation(len(pairs))
  pairs = [pairs[i] for i in order]
  plain = scorer.score_tokens(pairs)
  n_plain = len(scorer.shapes)
  shared = scorer.score_shared(pairs)
  for (ll, greedy), (ll_s, greedy_s) in zip(plain, shared):
    assert ll_s == pytest.approx(ll, abs=1e-4)
    assert greedy_s == greedy
  assert scorer.shared_shapes and len(scorer.shapes) >= n_plain
  assert scorer._shared._cache_size() == len(scorer.shared_shapes)  # pylint: disable=protected-access


def test_generation_that_cannot_stop_or_fit_is_refused_before_it_compiles(fx):
  """A tokenizer without EOS (none of ours; a Hugging Face model without one is refused at
  import) and a task without stop sequences: a UserError naming the task and the fix, as is
  max_new_tokens that leaves no room for the prompt; nothing compiled."""
  from llm_jax import errors  # pylint: disable=import-outside-toplevel
  from llm_jax import loader  # pylint: disable=import-outside-toplevel
  from llm_jax.evals import engine  # pylint: disable=import-outside-toplevel
  scorer = engine.Scorer(loader.load(fx["workdir"], config.load(BASE, **fx["fields"])),
                         progress=False)
  scorer.check_generation((), 8, "task 'gen'")  # our tokenizer's EOS stops it
  scorer.eos_ids = []
  with pytest.raises(errors.UserError, match="task 'gen'.*no EOS.*no stop sequence.*'until'"):
    scorer.check_generation(("",), 8, "task 'gen'")
  scorer.check_generation(("\n",), 8, "task 'gen'")
  with pytest.raises(errors.UserError, match="max_new_tokens=64 leaves no room"):
    scorer.check_generation(("\n",), 64, "task 'gen'")
  assert scorer.compiles == 0


def test_rolling_windows_are_lm_evals(fx):
  """Our rolling windows are lm-eval's get_rolling_token_windows + make_disjoint_window."""
  from lm_eval import utils as lm_utils  # pylint: disable=import-outside-toplevel
  from llm_jax.evals import scoring  # pylint: disable=import-outside-toplevel
  del fx
  for n in (0, 1, 5, 16, 17, 33, 100):
    for max_len in (1, 4, 16):
      tokens = list(range(10, 10 + n))
      ref = [lm_utils.make_disjoint_window(w)
             for w in lm_utils.get_rolling_token_windows(tokens, 2, max_len, 1)]
      assert scoring.rolling_windows(tokens, 2, max_len) == ref, (n, max_len)


def test_generation_answers_are_extracted_and_matched_as_lm_eval_does():
  """GSM8K's two filters (lm-eval's RegexFilter with its YAML's patterns) and exact match
  (exact_match_hf_evaluate with its regexes_to_ignore, ignore_case) on generations that hit
  each branch: a match, several matches, an empty group, none."""
  from lm_eval.api import metrics as lm_metrics  # pylint: disable=import-outside-toplevel
  from lm_eval.filters.extraction import RegexFilter  # pylint: disable=import-outside-toplevel
  from llm_jax.evals import scoring  # pylint: disable=import-outside-toplevel
  ans = tasks_lib.STANDARD["gsm8k"].answer
  refs = ["so 1,234.\n#### 1,234", "then\n#### 7", "#### -3", "x\n#### $5.", "#### 12"]
  gens = [" She has 3 + 4.\n#### 1,234", " 7 apples, then 8\n####7", " #### -3.\nQ", " no number",
          " $5. #### 5. and #### 6"]
  for name, (pattern, group) in ans["filters"].items():
    theirs = [r[0] for r in RegexFilter(pattern, group).apply([[g] for g in gens], [{}] * 5)]
    ours = [scoring.regex_extract(g, pattern, group) for g in gens]
    assert ours == theirs, name
    for got, ref in zip(ours, refs):
      em = lm_metrics.exact_match_hf_evaluate([got], [ref], ans["regexes_to_ignore"],
                                              ans["ignore_case"], ans["ignore_punctuation"])
      assert scoring.exact_match(got, ref, ans["regexes_to_ignore"], ans["ignore_case"],
                                 ans["ignore_punctuation"]) == em["exact_match"], (name, got)


def test_built_in_tasks_run_offline_and_report_chance(fx, cli):
  """Without tasks: the three built-in tasks on the held-out plays, each with its chance."""
  flags = [f"--config={BASE}"] + [f"--config.{k}={v}" for k, v in fx["fields"].items()]
  code, out = cli("--mode=tasks", f"--workdir={fx['workdir']}", *flags, "--config.tasks_limit=8")
  assert code == 0, out[-3000:]
  with open(os.path.join(fx["workdir"], "tasks", "step_4", "results.json"),
            encoding="utf-8") as f:
    r = json.load(f)["tasks"]
  assert sorted(r) == ["play_last_word", "play_next_line", "play_speaker"]
  assert r["play_next_line"]["chance"] == 0.25 and r["play_last_word"]["chance"] == 0.0
  assert 1 / 4 <= r["play_speaker"]["chance"] <= 1 / 2
  assert all(t["items"] == 8 for t in r.values())
  assert math.isfinite(r["play_last_word"]["metrics"]["perplexity"])


def test_tasks_every_logs_the_scores_mode_tasks_gives_the_saved_checkpoint(fx, cli, tmp_path):
  """tasks_every: a short training run logs each task's metrics to metrics.jsonl; at the last
  step they equal --mode=tasks on the checkpoint saved there."""
  mine = tmp_path / "mine.jsonl"
  rng = np.random.default_rng(5)
  mine.write_text("".join(json.dumps({"context": _words(rng, 6), "target": " " + _words(rng, 2)})
                          + "\n" for _ in range(5)), encoding="utf-8")
  fields = {**fx["fields"], "num_train_steps": 4, "warmup_steps": 1, "tasks_every": 2,
            "tasks": f"mine={mine},lambada_openai={fx['hub_dir']}/lambada_openai"}
  flags = [f"--config={BASE}"] + [f"--config.{k}={v}" for k, v in fields.items()]
  workdir = tmp_path / "run"
  code, out = cli("--mode=train", f"--workdir={workdir}", *flags)
  assert code == 0, out[-3000:]
  logged = {}
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if "tasks/mine/perplexity" in r:
        logged[r["step"]] = r
  assert sorted(logged) == [2, 4]
  code, out = cli("--mode=tasks", f"--workdir={workdir}", *flags)
  assert code == 0, out[-3000:]
  with open(workdir / "tasks" / "step_4" / "results.json", encoding="utf-8") as f:
    report = json.load(f)
  for name in ("mine", "lambada_openai"):
    for k, v in report["tasks"][name]["metrics"].items():
      assert logged[4][f"tasks/{name}/{k}"] == pytest.approx(v, rel=1e-5), (name, k)
  assert logged[4]["tasks/core"] == pytest.approx(report["core"])
  assert logged[2]["tasks/mine/perplexity"] != logged[4]["tasks/mine/perplexity"]


# --- lm-eval's hf backend (torch), recorded once by tests/fixtures/make_eval_fixtures.py --------

EVAL_FIXTURES = os.path.join(ROOT, "tests", "fixtures", "evals")
HF_GPT2 = os.path.join(ROOT, "tests", "fixtures", "hf", "gpt2")


@pytest.fixture(scope="module")
def gpt2_workdir(tmp_path_factory):
  def make():
    from configs import base  # pylint: disable=import-outside-toplevel
    from llm_jax import hf  # pylint: disable=import-outside-toplevel
    workdir = str(tmp_path_factory.mktemp("evals_gpt2") / "run")
    hf.import_to_workdir(base.get_config(), HF_GPT2, workdir)
    return workdir
  return run_once.once(tmp_path_factory, "evals_gpt2", make)


def _check_against_hf_reference(reference, workdir, cli):
  names = list(reference["tasks"])
  spec = ",".join(f"{n}={os.path.join(EVAL_FIXTURES, n + '.jsonl')}" for n in names)
  code, out = cli("--mode=tasks", f"--workdir={workdir}", f"--config.tasks={spec}",
                  "--config.tasks_batch_size=8")
  assert code == 0, out[-3000:]
  with open(os.path.join(workdir, "tasks", "step_0", "results.json"), encoding="utf-8") as f:
    ours = json.load(f)["tasks"]
  for name, ref in reference["tasks"].items():
    with open(os.path.join(workdir, "tasks", "step_0", f"{name}.jsonl"), encoding="utf-8") as f:
      items = [json.loads(line) for line in f]
    assert len(items) == len(ref["lls"]), name
    for item, lls in zip(items, ref["lls"]):
      np.testing.assert_allclose(item.get("scores") or [item["ll"]], lls, atol=1e-4,
                                 err_msg=name)
    assert set(ours[name]["metrics"]) == set(ref["metrics"]), name
    for k, v in ref["metrics"].items():
      # accuracies are counts over a few items: equal; perplexities of sums within 1e-4
      assert ours[name]["metrics"][k] == pytest.approx(v, rel=1e-4, abs=0), (name, k)


def test_mode_tasks_equals_lm_evals_hf_backend_on_a_hugging_face_model(gpt2_workdir, cli):
  """The GPT-2 fixture imported here and scored by --mode=tasks: per-request log-likelihoods
  within 1e-4 of what lm-eval's own hf backend (torch) computed for the same files, and the
  same metrics (tests/fixtures/evals/reference.json)."""
  with open(os.path.join(EVAL_FIXTURES, "reference.json"), encoding="utf-8") as f:
    reference = json.load(f)
  _check_against_hf_reference(reference, gpt2_workdir, cli)


@pytest.mark.hf
def test_hf_backend_reference_is_what_lm_eval_computes_now(gpt2_workdir, cli, tmp_path):
  """Live: make_eval_fixtures.py run again (LLM_JAX_HF_PYTHON: a Python with torch,
  transformers and lm-eval) gives what --mode=tasks computes."""
  import subprocess  # pylint: disable=import-outside-toplevel
  python = os.environ.get("LLM_JAX_HF_PYTHON", sys.executable)
  p = subprocess.run([python, os.path.join(ROOT, "tests", "fixtures", "make_eval_fixtures.py"),
                      "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                     check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  with open(tmp_path / "reference.json", encoding="utf-8") as f:
    _check_against_hf_reference(json.load(f), gpt2_workdir, cli)
