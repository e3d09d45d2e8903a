"""Figures the docs state about the code, recomputed from the code so that they cannot drift:
each config's parameter count (its docstring and README's configs table, with the table's
shape columns), README's `--mode=estimate` example, and the step count of the shipped default
run in bench/RESULTS.md. The parameter counts come from jax.eval_shape: nothing is allocated.
"""

import ast
import glob
import os
import re

import pytest

from llm_jax import config
from llm_jax import sizing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# finetune.py has no model of its own: its fields come from init_from.
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("__init__.py", "base.py", "finetune.py")))


def _read(*parts):
  with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
    return f.read()


def _stated_matches(stated: str, n: int) -> bool:
  """'124.5M' or '1.32B' equals n rounded to the figure's own precision."""
  number, unit = stated[:-1], stated[-1]
  decimals = len(number.split(".")[1]) if "." in number else 0
  return f"{n / {'M': 1e6, 'B': 1e9}[unit]:.{decimals}f}" == number


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_figures_in_docstring_and_readme_are_the_code(path):
  cfg = config.load(path)
  n = sizing.estimate(cfg).n_params
  name = os.path.basename(path)
  doc = ast.get_docstring(ast.parse(_read("configs", name)))
  for stated in re.findall(r"Expect ([\d.]+[MB]) parameters", doc):
    assert _stated_matches(stated, n), f"configs/{name} says {stated}, the model has {n:,}"
  row = re.search(rf"^\| `configs/{re.escape(name)}` \|(.*)$", _read("README.md"), re.M)
  assert row, f"README's configs table has no row for configs/{name}"
  cells = [c.strip() for c in row.group(1).split("|")]
  params, d_model, layers, heads, context, batch = cells[1:7]
  assert _stated_matches(params, n), f"README says {params} for configs/{name}: {n:,}"
  assert [d_model, layers, heads, context, batch] == [
      str(v) for v in (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_seq_len, cfg.batch_size)]


def test_readme_estimate_example_is_what_the_estimate_prints():
  readme = _read("README.md")
  block = re.search(r"\$ python main.py --config=configs/small.py --mode=estimate\n(.*?)\n```",
                    readme, re.S)
  assert block, "README lost its --mode=estimate example"
  cfg = config.load(os.path.join(ROOT, "configs", "small.py"))
  assert block.group(1) == sizing.report(cfg, sizing.estimate(cfg)), (
      "README's estimate example is stale: paste the output of python main.py "
      "--config=configs/small.py --mode=estimate")


def test_results_name_the_shipped_default_run_length():
  steps = config.load(os.path.join(ROOT, "configs", "default.py")).num_train_steps
  results = _read("bench", "RESULTS.md")
  assert f"(configs/default.py, {steps} steps)" in results
  assert f"trained for {steps} steps" in results


def test_every_study_has_a_readme_section_and_its_pictures_are_committed():
  readme = _read("README.md")
  studies = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments",
                                                                            "*.py"))
                   if os.path.basename(p) not in ("__init__.py", "common.py"))
  assert len(studies) == 8, studies
  for study in studies:
    assert f"`python -m experiments.{study} --out=results/{study}" in readme, (
        f"README has no section with the command of experiments/{study}.py")
  pictures = re.findall(r"!\[[^\]]*\]\((docs/experiments/[^)]+\.png)\)", readme)
  assert len(pictures) >= len(studies)
  for path in pictures:
    full = os.path.join(ROOT, path)
    assert os.path.exists(full), f"README shows {path}, which is not committed"
    assert os.path.getsize(full) < 150_000, f"{path} is large for a README picture"
