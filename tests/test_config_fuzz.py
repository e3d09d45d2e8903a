"""Fuzzing the command line (issue 24, section 2): whatever --config.<field>=<value> overrides a
user types, main.py's parse, validation and --mode=estimate end with exit 0, or exit 2 and one
`error:` line; never exit 4 (a bug) or a traceback.

hypothesis draws 1-4 overrides per command: real field names of configs/base.py and misspelt
ones; values of the field's type (in range and far out of it: negative, zero, huge, NaN, inf),
of another type, and empty; and combinations of the fields that constrain each other (the batch
fields, the head fields, the position fields, LoRA and quantization). Each command runs main.py's
entry in this process (`main.cli`, as tests/test_bad_input.py does). Bounded for CI: a fixed
number of examples, derandomized (the same examples on every run), a deadline per example.
Every failure it found is a case of tests/test_bad_input.py's table.
"""

import os
import string
import sys

import hypothesis
from hypothesis import strategies as st
import pytest

from configs import base
from llm_jax import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import main  # pylint: disable=g-import-not-at-top,wrong-import-position

BASE = os.path.join(ROOT, "configs", "base.py")
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

_CFG = base.get_config()
FIELDS = sorted(_CFG.keys())
TYPES = {f: _CFG.get_type(f) for f in FIELDS}
# The values a string field takes (config.py's choices) and some it does not.
CHOICES = sorted({v for name in dir(config) if name.isupper()
                  for v in (getattr(config, name) if isinstance(getattr(config, name), tuple)
                            else ()) if isinstance(v, str)})
# Fields that constrain one another: drawn together, with small values that often pass, so
# that many commands get past validation into the estimate.
LINKED = {
    "d_model": [16, 32, 48, 64, 96, 128], "n_heads": [1, 2, 3, 4, 8], "n_kv_heads": [1, 2, 4],
    "d_k": [4, 8, 15, 16], "d_v": [8, 16], "d_ff": [0, 32, 100], "n_layers": [1, 2, 3, 300],
    "vocab_size": [1, 64, 100, 256], "vocab_multiple": [1, 64, 0],
    "max_seq_len": [8, 16, 64, 1 << 20], "block_size": [4, 16, 64],
    "max_position_embeddings": [4, 16, 128],
    "batch_size": [1, 8, 12, 30, 64], "micro_batch_size": [1, 2, 4, 8],
    "gradient_accumulation_steps": [1, 2, 3, 4], "mesh_shape": ["(1,1,1)", "(-1,1,1)", "(2,2,1)",
                                                                "(-1,-1,1)"],
    "position_embedding": ["rope", "learned", "sinusoidal"],
    "rope_scaling": ["none", "linear", "llama3"], "rope_scaling_factor": [0.0, 1.0, 8.0],
    "activation": ["swiglu", "gelu", "relu"], "tie_embeddings": [True, False],
    "lora_r": [0, 4], "lora_targets": ["all", "q,v", "gate", "wi", ""],
    "load_in_8bit": [True, False], "load_in_4bit": [True, False], "quant_group_size": [1, 7, 64],
    "num_beams": [1, 2], "num_return_sequences": [1, 2, 3], "do_sample": [True, False],
    "max_new_tokens": [0, 1, 8], "min_length": [0, 4, 9], "dtype": ["bfloat16", "float16", "int8"],
    "scan_layers": [True, False], "remat_policy": ["none", "full", "dots"],
}
LINKED = {f: v for f, v in LINKED.items() if f in TYPES}  # (a field renamed since)


def _misspelt(name: str) -> st.SearchStrategy:
  """`name` with one character dropped, doubled, swapped or replaced."""
  def edit(args):
    i, op, c = args
    i %= len(name)
    if op == 0:
      return name[:i] + name[i + 1:]
    if op == 1:
      return name[:i] + name[i] + name[i:]
    if op == 2 and i + 1 < len(name):
      return name[:i] + name[i + 1] + name[i] + name[i + 2:]
    return name[:i] + c + name[i + 1:]
  return st.tuples(st.integers(0, 99), st.integers(0, 3),
                   st.sampled_from(string.ascii_lowercase + "_")).map(edit)


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
_INTS = st.one_of(st.integers(-3, 3), st.sampled_from([-1, 0, 1, 7, 1 << 31, 1 << 62, 10**30]),
                  st.integers(-(1 << 40), 1 << 40))
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -1.0, 1e-9, 0.5, 1.0, 2.0, 1e30])).map(repr)


def _right_type(field: str) -> st.SearchStrategy:
  t = TYPES[field]
  if t is bool:
    return st.sampled_from(["True", "False", "true", "false", "1", "0"])
  if t is int:
    return _INTS.map(str)
  if t is float:
    return st.one_of(_FLOATS, _INTS.map(str))
  if t is tuple:
    return st.lists(st.integers(-2, 3), min_size=0, max_size=4).map(
        lambda xs: "(" + ",".join(map(str, xs)) + ("," if len(xs) == 1 else "") + ")")
  return st.one_of(st.sampled_from(CHOICES), _TEXT)


_WRONG = st.sampled_from(["", "abc", "1.5", "1e400", "-", "[1, 2]", "(1,", "None", "{}", "nan",
                          "True", "0x10", "3,4", "'x'", "1_000", " 7 "])


def _override(field_names: st.SearchStrategy) -> st.SearchStrategy:
  return field_names.flatmap(lambda f: st.tuples(st.just(f), st.one_of(_right_type(f), _WRONG)))


_REAL = st.sampled_from(FIELDS)
_ONE = st.one_of(
    _override(_REAL),
    st.tuples(_REAL.flatmap(_misspelt), _right_type("seed")),
    st.tuples(st.from_regex(r"[a-z][a-z_.]{0,14}", fullmatch=True), _TEXT),
)
_LINKED = st.sampled_from(sorted(LINKED)).flatmap(
    lambda f: st.tuples(st.just(f), st.sampled_from([str(v) for v in LINKED[f]])))
# The shape fields at every order of magnitude, 1 to 2**100, alone and together.
SHAPE_FIELDS = ["vocab_size", "vocab_multiple", "d_model", "n_heads", "n_kv_heads", "n_layers",
                "d_ff", "d_k", "d_v", "max_seq_len", "block_size", "max_position_embeddings",
                "micro_batch_size", "batch_size", "gradient_accumulation_steps", "lora_r"]
_SHAPES = st.tuples(st.sampled_from(SHAPE_FIELDS), st.integers(0, 100).map(lambda e: str(2**e)))
OVERRIDES = st.one_of(
    st.lists(_ONE, min_size=1, max_size=3),
    st.lists(_SHAPES, min_size=1, max_size=3, unique_by=lambda o: o[0]),
    st.lists(_LINKED, min_size=1, max_size=5, unique_by=lambda o: o[0]),
    st.tuples(st.lists(_LINKED, min_size=1, max_size=3), _ONE).map(lambda p: p[0] + [p[1]]),
)


@pytest.fixture(scope="module")
def run_cli():
  """main.py's entry in this process: (exit code, stdout + stderr)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  with pytest.MonkeyPatch.context() as mp:
    # Process-wide settings a real run makes for itself, kept out of the test process.
    mp.setattr(main, "_honour_omp_num_threads", lambda: None)
    mp.setattr(main, "_enable_compilation_cache", lambda cfg: None)

    def call(args):
      out = io.StringIO()
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main.cli(["main.py", *args])
      return code, out.getvalue()
    assert call(["--mode=estimate", f"--config={BASE}"])[0] == 0  # jax starts here, once
    yield call


def _argv(overrides):
  return ["--mode=estimate", f"--config={BASE}"] + [f"--config.{f}={v}" for f, v in overrides]


def check(run_cli, overrides):
  code, out = run_cli(_argv(overrides))
  errors_ = [l for l in out.splitlines() if l.startswith("error:")]
  assert "Traceback" not in out and code in (0, 2), (overrides, code, out[-3000:])
  assert len(errors_) == (code == 2), (overrides, code, out[-3000:])


@hypothesis.settings(max_examples=120, deadline=5000, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck),
                     print_blob=False)
@hypothesis.given(overrides=OVERRIDES)
def test_any_overrides_end_in_exit_0_or_one_error_line(run_cli, overrides):
  check(run_cli, overrides)
