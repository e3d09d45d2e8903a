"""Bad input, given as a user gives it: every case ends with a documented exit code and one
`error:` line naming the field, flag or file, never a traceback, and loses nothing.

Each case runs main.py's entry (`main.cli`: argv as on the command line, flags parsed afresh) in
this process, and asserts: the exit code (2 = bad input, see llm_jax/errors.py), `error:` and
every name the message must give, no `Traceback`, the files of an existing run's workdir (one
tiny run, shared by every case) unchanged, and no new workdir left behind by a refused
training run. The shared run is made without training (random params saved through the
project's Checkpointer): no case compiles anything. The workdir lock is checked against
another process holding it; the other exit codes (3 out of memory, 4 internal error) last.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import helpers  # tests/helpers.py
import run_once  # tests/run_once.py

from llm_jax import config
from llm_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import main  # pylint: disable=g-import-not-at-top,wrong-import-position

BASE = os.path.join(ROOT, "configs", "base.py")
# ml_collections loads config files with importlib's deprecated load_module(): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
# Learned positions over 16 slots: the default max_new_tokens=200 cannot fit (a case below).
TINY = dict(vocab_size=128, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
            n_layers=2, max_seq_len=16, position_embedding="learned", micro_batch_size=4,
            num_train_steps=8, eval_steps=0, sample_every_eval=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return run_once.once(tmp_path_factory, "bad_input_run",
                       lambda: helpers.saved_run(str(tmp_path_factory.mktemp("bad_input")), TINY))


def _snapshot(workdir):
  """Every file of the workdir with its size and modification time (the lock file aside: a
  refused training run takes the lock before it reads the checkpoint)."""
  out = {}
  for d, _, files in os.walk(workdir):
    for f in files:
      if f != workdir_lib.LOCK_NAME:
        st = os.stat(os.path.join(d, f))
        out[os.path.relpath(os.path.join(d, f), workdir)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture
def cli(capfd, monkeypatch):
  """main.py in this process: (exit code, everything it printed)."""
  # Process-wide settings a real run makes for itself, kept out of the test process.
  monkeypatch.setattr(main, "_honour_omp_num_threads", lambda: None)
  monkeypatch.setattr(main, "_enable_compilation_cache", lambda cfg: None)

  def call(*args):
    capfd.readouterr()
    code = main.cli(["main.py", *args])
    out, err = capfd.readouterr()
    return code, out + err
  return call


def _flags(fields, **overrides):
  return [f"--config={BASE}"] + [f"--config.{k}={v}" for k, v in {**fields, **overrides}.items()]


def _write(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(content, bytes) else "w") as f:
    f.write(content)
  return path


def _parquet(path, rows):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def _zst_cut(path, text):
  """A .zst file cut in the middle of its frame."""
  import zstandard  # pylint: disable=g-import-not-at-top
  data = zstandard.ZstdCompressor().compress(text.encode())
  return _write(path, data[:len(data) // 2])


def _text_dir(tmp, name, files):
  """A dataset directory of `files` ({name: str or bytes}) beside one good text file."""
  d = os.path.join(tmp, name)
  _write(os.path.join(d, "good.txt"), "Kalo mine ruvi sato.\n" * 300)
  for f, content in files.items():
    _write(os.path.join(d, f), content)
  return d


def _hf_without(tmp, key):
  """The Llama fixture with `key` removed from its config.json's RoPE parameters."""
  import shutil  # pylint: disable=g-import-not-at-top
  d = os.path.join(tmp, "hf_llama")
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf", "llama"), d)
  with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  rope = cfg.get("rope_parameters") or cfg["rope_scaling"]
  rope.pop(key)
  _write(os.path.join(d, "config.json"), json.dumps(cfg))
  return d


def _unwritable(tmp):
  """A directory this process cannot write in (root ignores permission bits: a sysfs path)."""
  d = os.path.join(tmp, "readonly")
  os.makedirs(d)
  os.chmod(d, 0o555)
  if os.access(d, os.W_OK):
    return "/sys/llm_jax_cannot_write_here"
  return os.path.join(d, "run")


# Each case: (id, a function (tmp, run) -> (argv after main.py, names the output must contain)).
# `new` below is a workdir that must not exist after the case.
def _cases():
  def est(*extra):
    return ["--mode=estimate", f"--config={BASE}", *extra]

  def train_new(tmp, run, **overrides):
    return ["--mode=train", f"--workdir={tmp}/new"] + _flags(run["fields"], **overrides)

  def sft(tmp, run, dataset, **overrides):
    return train_new(tmp, run, init_from=run["workdir"], objective="sft", dataset=dataset,
                     validation="", **overrides)

  def on_run(mode, run, *extra, **overrides):
    return [f"--mode={mode}", f"--workdir={run['workdir']}", *extra] + _flags(run["fields"],
                                                                              **overrides)

  def broken_config(tmp, body):
    return _write(os.path.join(tmp, "my_config.py"), body)

  return [
      # Flags, config files and config fields.
      ("unknown_field", lambda t, r: (est("--config.learning_rat=3e-4"),
                                      ["learning_rat", "learning_rate"])),
      ("two_unknown_fields", lambda t, r: (est("--config.lerning_rate=1", "--config.seeed=2"),
                                           ["lerning_rate", "learning_rate", "seeed", "seed"])),
      ("missing_config_file", lambda t, r: (["--mode=estimate", "--config=configs/nope.py"],
                                            ["configs/nope.py", "no such file"])),
      ("config_is_a_directory", lambda t, r: (["--mode=estimate", f"--config={t}"], [t])),
      ("config_raises", lambda t, r: (
          ["--mode=estimate", "--config=" + broken_config(
              t, "def get_config():\n  raise RuntimeError('broken on purpose')\n")],
          ["my_config.py", "broken on purpose"])),
      ("config_without_get_config", lambda t, r: (
          ["--mode=estimate", "--config=" + broken_config(t, "x = 1\n")],
          ["my_config.py", "AttributeError", "get_config"])),
      ("field_value_of_wrong_type", lambda t, r: (est("--config.seed=abc"), ["seed", "abc"])),
      ("unknown_flag", lambda t, r: (["--modee=train"], ["modee", "mode"])),
      ("unknown_mode", lambda t, r: (["--mode=serve"], ["serve"])),
      ("stray_argument", lambda t, r: (est("runs/default"), ["runs/default"])),
      ("negative_seed", lambda t, r: (train_new(t, r, seed=-1), ["seed=-1"])),
      ("n_heads_not_dividing", lambda t, r: (est("--config.n_heads=7"), ["n_heads=7"])),
      ("top_p_zero", lambda t, r: (est("--config.top_p=0"), ["top_p=0"])),
      ("batch_size_contradiction", lambda t, r: (
          est("--config.batch_size=30", "--config.micro_batch_size=8",
              "--config.gradient_accumulation_steps=4"),
          ["batch_size=30", "micro_batch_size=8", "gradient_accumulation_steps=4"])),
      ("batch_size_alone_indivisible", lambda t, r: (
          est("--config.batch_size=30", "--config.gradient_accumulation_steps=4"),
          ["batch_size=30", "gradient_accumulation_steps=4"])),
      ("max_new_tokens_zero", lambda t, r: (est("--config.max_new_tokens=0"),
                                            ["max_new_tokens=0"])),
      # Long context: RoPE scaling and the sliding window.
      ("rope_scaling_unknown", lambda t, r: (est("--config.rope_scaling=ntk"),
                                             ["rope_scaling='ntk'", "dynamic", "yarn"])),
      ("rope_scaling_parameter_missing", lambda t, r: (
          est("--config.rope_scaling=yarn", "--config.rope_scaling_factor=4"),
          ["rope_scaling='yarn'", "--config.rope_original_max_len="])),
      ("rope_scaling_parameter_unknown", lambda t, r: (est("--config.rope_beta_fats=8"),
                                                       ["rope_beta_fats", "rope_beta_fast"])),
      ("rope_scaling_parameter_of_another_type", lambda t, r: (
          est("--config.rope_scaling=linear", "--config.rope_scaling_factor=2",
              "--config.rope_beta_fast=8"),
          ["rope_beta_fast=8.0", "rope_scaling='linear'", "'yarn'"])),
      ("sliding_window_larger_than_context", lambda t, r: (
          est("--config.sliding_window=512"), ["sliding_window=512", "max_seq_len=256"])),
      ("sliding_window_not_positive", lambda t, r: (est("--config.sliding_window=0"),
                                                    ["sliding_window=0", "positive"])),
      ("hf_rope_parameter_missing", lambda t, r: (
          ["--mode=import", f"--config.hf_path={_hf_without(t, 'low_freq_factor')}",
           f"--workdir={t}/new"], ["'low_freq_factor'", "rope_type='llama3'"])),
      ("greedy_with_several_sequences", lambda t, r: (
          est("--config.num_return_sequences=2", "--config.do_sample=False"),
          ["num_return_sequences=2", "do_sample"])),
      ("mesh_shape_of_two", lambda t, r: (est("--config.mesh_shape=(1,1)"), ["mesh_shape"])),
      # Found by tests/test_config_fuzz.py: widths past any model were a MemoryError or an
      # OverflowError (exit 4) in --mode=estimate.
      ("d_model_past_any_model", lambda t, r: (est("--config.d_model=1099511627776"),
                                               ["d_model=1099511627776", "at most"])),
      ("vocab_size_past_int32", lambda t, r: (est("--config.vocab_size=1099511627776"),
                                              ["vocab_size=1099511627776", "at most"])),
      ("d_k_past_any_model", lambda t, r: (est("--config.d_k=1099511627776"), ["d_k="])),
      ("max_position_embeddings_huge", lambda t, r: (
          est("--config.position_embedding=learned", f"--config.max_position_embeddings={2**90}"),
          [f"max_position_embeddings={2**90}"])),
      # Context parallelism: the sequence must split over the context axis (into a front and a
      # back chunk per device with load balancing); the fused kernels cannot take it.
      ("context_does_not_split_the_sequence", lambda t, r: (
          est("--config.mesh_shape=(1,1,1,3)"),
          ["block_size=256", "context parallelism 3", "multiple of 6", "mesh_shape"])),
      ("context_unbalanced_does_not_split", lambda t, r: (
          est("--config.mesh_shape=(1,1,1,3)", "--config.context_load_balance=False"),
          ["block_size=256", "multiple of 3"])),
      ("context_load_balance_needs_twice", lambda t, r: (
          train_new(t, r, mesh_shape="(1,1,1,16)"),  # 16 divides 16 tokens, 32 does not
          ["block_size=16", "context_load_balance=True", "multiple of 32"])),
      ("context_with_a_fused_kernel", lambda t, r: (
          est("--config.mesh_shape=(1,1,1,2)", "--config.use_flash_attention=True"),
          ["use_flash_attention=True", "--config.use_flash_attention=False"])),
      ("context_parallel_impl_unknown", lambda t, r: (
          est("--config.context_parallel_impl=ulysses"),
          ["context_parallel_impl='ulysses'", "all_gather, ring"])),
      ("logical_axis_rules_unknown_axis", lambda t, r: (
          est("--config.logical_axis_rules=vocab:tensorx"), ["logical_axis_rules", "tensorx"])),
      ("checkpoint_step_in_train", lambda t, r: (train_new(t, r, checkpoint_step=4),
                                                 ["checkpoint_step=4"])),
      ("validation_with_shakespeare", lambda t, r: (
          train_new(t, r, dataset="shakespeare", validation=f"{t}/val/*.txt"),
          ["validation=", "shakespeare"])),
      ("multihost_flags_incomplete", lambda t, r: (
          est("--coordinator_address=localhost:12399"), ["--num_processes", "--process_id"])),
      ("multihost_rank_out_of_range", lambda t, r: (
          est("--coordinator_address=localhost:12399", "--num_processes=2", "--process_id=5"),
          ["--process_id=5"])),
      # Workdirs.
      ("train_without_workdir", lambda t, r: (["--mode=train"] + _flags(r["fields"]),
                                              ["--workdir"])),
      ("workdir_is_a_file", lambda t, r: (
          ["--mode=train", "--workdir=" + _write(f"{t}/file.txt", "x")] + _flags(r["fields"]),
          [f"{t}/file.txt", "not a directory"])),
      ("workdir_not_writable", lambda t, r: (
          ["--mode=train", f"--workdir={_unwritable(t)}"] + _flags(r["fields"]),
          ["not writable"])),
      ("eval_workdir_missing", lambda t, r: (
          ["--mode=eval", f"--workdir={t}/nope"] + _flags(r["fields"]), [f"{t}/nope"])),
      ("sample_workdir_is_a_file", lambda t, r: (
          ["--mode=sample", "--workdir=" + _write(f"{t}/f.txt", "x")] + _flags(r["fields"]),
          [f"{t}/f.txt"])),
      ("sample_workdir_without_checkpoints", lambda t, r: (
          ["--mode=sample", f"--workdir={t}"] + _flags(r["fields"]), ["no checkpoint", t])),
      # Checkpoints and what reads them.
      ("eval_checkpoint_step_not_saved", lambda t, r: (
          on_run("eval", r, checkpoint_step=3), ["checkpoint_step=3", "available: [4]"])),
      ("eval_model_changed", lambda t, r: (on_run("eval", r, d_model=48),
                                           ["d_model: the checkpoint has 32", "asks 48"])),
      ("train_model_changed", lambda t, r: (on_run("train", r, d_model=48),
                                            ["d_model: 32 -> 48", "new --workdir"])),
      ("eval_mesh_does_not_fit", lambda t, r: (on_run("eval", r, mesh_shape="(3,1,1)"),
                                               ["mesh_shape"])),
      ("sample_mesh_does_not_fit", lambda t, r: (on_run("sample", r, mesh_shape="(3,1,1)"),
                                                 ["mesh_shape"])),
      ("estimate_compile_mesh_does_not_fit", lambda t, r: (
          est("--compile", "--config.mesh_shape=(3,1,1)"), ["mesh_shape"])),
      ("compile_unknown_gpu_target", lambda t, r: (
          ["--mode=compile", f"--config={BASE}", "--config.compile_topology=h300"],
          ["compile_topology", "h300", "h100, h200, a100-80gb", "2x8xh100"])),
      # Quantized loading settings the checkpoint's model cannot take (quantize.check).
      ("quant_group_size_does_not_divide", lambda t, r: (
          on_run("eval", r, load_in_4bit=True, quant_group_size=24),
          ["quant_group_size=24", "32"])),
      ("quantize_embeddings_of_a_tied_head", lambda t, r: (
          on_run("eval", r, load_in_8bit=True, quantize_embeddings=True),
          ["quantize_embeddings=True", "quantize_embeddings=False"])),
      # Sampling input.
      ("prompt_file_missing", lambda t, r: (on_run("sample", r, f"--prompt_file={t}/p.txt"),
                                            [f"{t}/p.txt"])),
      ("prompt_file_is_a_directory", lambda t, r: (on_run("sample", r, f"--prompt_file={t}"),
                                                   [t, "directory"])),
      ("prompt_file_not_utf8", lambda t, r: (
          on_run("sample", r, "--prompt_file=" + _write(f"{t}/p.txt", b"KING:\xff\xfe\n")),
          [f"{t}/p.txt", "UTF-8"])),
      ("prompt_file_empty", lambda t, r: (
          on_run("sample", r, "--prompt_file=" + _write(f"{t}/p.txt", "\n\n")),
          [f"{t}/p.txt", "no prompt"])),
      ("prompt_past_learned_positions", lambda t, r: (
          on_run("sample", r, "--prompt=Kalo", max_new_tokens=100),
          ["max_new_tokens=100", "max_position_embeddings=16"])),
      ("stop_token_of_several_tokens", lambda t, r: (
          on_run("sample", r, "--prompt=Kalo", max_new_tokens=4,
                 stop_token="kalomine ruvisato"), ["stop_token"])),
      # Datasets (training a new workdir).
      ("dataset_path_missing", lambda t, r: (train_new(t, r, dataset=f"text:{t}/nope"),
                                             [f"{t}/nope"])),
      ("dataset_glob_matches_nothing", lambda t, r: (
          train_new(t, r, dataset=f"text:{t}/*.nothing", validation=""),
          ["*.nothing", "matches no files"])),
      ("dataset_mostly_invalid_utf8", lambda t, r: (
          train_new(t, r, validation="", dataset="text:" + _text_dir(
              t, "latin1", {"old.txt": "Caf\xe9 cr\xe8me br\xfbl\xe9e.\n".encode("latin-1") * 40})),
          ["old.txt", "UTF-8", "iconv"])),
      ("dataset_glob_matches_binary", lambda t, r: (
          train_new(t, r, validation="", dataset="text:" + _text_dir(
              t, "mixed", {"logo.png": bytes(range(256)) * 20}) + "/*"),
          ["logo.png", "binary"])),
      ("dataset_empty_file", lambda t, r: (
          train_new(t, r, validation="", dataset="text:" + _text_dir(t, "e", {"z.txt": " \n"})),
          ["z.txt", "empty"])),
      ("jsonl_not_json", lambda t, r: (
          train_new(t, r, validation="", dataset="text:" + _write(
              f"{t}/c.jsonl", '{"text": "fine"}\n{"text": oops}\n')), ["c.jsonl:2", "JSON"])),
      ("text_split_with_jsonl_only", lambda t, r: (
          train_new(t, r, validation="", text_split="paragraph", dataset="text:" + _write(
              f"{t}/c.jsonl", '{"text": "fine"}\n')), ["text_split='paragraph'", ".jsonl"])),
      ("text_key_without_jsonl", lambda t, r: (train_new(t, r, text_key="content"),
                                               ["text_key='content'"])),
      ("parquet_without_text_column", lambda t, r: (
          train_new(t, r, validation="", dataset="text:" + _parquet(
              f"{t}/p.parquet", [{"body": "Kalo mine ruvi sato.", "id": 1}])),
          ["p.parquet", "text_key='text'", "body, id"])),
      ("jsonl_zst_truncated", lambda t, r: (
          train_new(t, r, validation="", dataset="text:" + _zst_cut(
              f"{t}/c.jsonl.zst", '{"text": "Kalo mine ruvi sato."}\n' * 4000)),
          ["c.jsonl.zst", "corrupt or truncated", "at byte"])),
      ("mixture_weight_not_a_number", lambda t, r: (
          train_new(t, r, validation="", dataset=f"mix:abc*{r['fields']['dataset']},1*shakespeare"),
          ["dataset=", "'abc'", "not a number"])),
      ("mixture_weights_sum_to_zero", lambda t, r: (
          train_new(t, r, validation="", dataset=f"mix:0*{r['fields']['dataset']},0*shakespeare"),
          ["dataset=", "sum to 0"])),
      ("mixture_with_validation_glob", lambda t, r: (
          train_new(t, r, dataset=f"mix:1*{r['fields']['dataset']},1*shakespeare"),
          ["validation=", "mixture"])),
      ("mixture_source_empty", lambda t, r: (
          train_new(t, r, validation="", dataset=f"mix:1*{r['fields']['dataset']},1*text:"
                    + _write(f"{t}/z/z.jsonl", "")), ["z.jsonl", "empty"])),
      ("tfds_data_dir_with_text_dataset", lambda t, r: (train_new(t, r, tfds_data_dir=t),
                                                        ["tfds_data_dir"])),
      ("tfds_dataset_unknown", lambda t, r: (
          train_new(t, r, dataset="tfds:no_such_dataset_xyz", validation=""),
          ["no_such_dataset_xyz"])),
      # Fine-tuning fields a training run cannot honour (loader.check_train).
      ("lora_without_init_from", lambda t, r: (train_new(t, r, lora_r=4),
                                               ["lora_r=4", "init_from"])),
      ("lora_with_muon", lambda t, r: (
          train_new(t, r, lora_r=4, init_from=r["workdir"], optimizer="muon"),
          ["optimizer='muon'", "lora_r=4", "optimizer=adamw"])),
      ("lora_tables_without_lora_r", lambda t, r: (
          train_new(t, r, init_from=r["workdir"], lora_train_embeddings=True),
          ["lora_train_embeddings=True", "lora_r=0"])),
      ("lora_trainable_tokens_many_pieces", lambda t, r: (
          train_new(t, r, lora_r=4, init_from=r["workdir"],
                    lora_trainable_tokens="kalomine ruvisato"),
          ["lora_trainable_tokens='kalomine ruvisato'", "tokens"])),
      ("lora_trainable_tokens_id_out_of_range", lambda t, r: (
          train_new(t, r, lora_r=4, init_from=r["workdir"], lora_trainable_tokens="5,99999"),
          ["99999", "0..127"])),
      ("lora_tables_both_fields", lambda t, r: (
          est("--config.lora_train_embeddings=True", "--config.lora_trainable_tokens=5"),
          ["lora_trainable_tokens='5'", "lora_train_embeddings=True"])),
      ("tokenizer_path_not_a_model", lambda t, r: (
          train_new(t, r, tokenizer_path=_write(f"{t}/tok.model", "not a model")),
          [f"{t}/tok.model"])),
      # Serving: an address it cannot listen on is found before the model loads.
      ("serve_port_in_use", lambda t, r: (
          on_run("serve", r, serve_port=_held_port()), ["127.0.0.1", "serve_port"])),
      ("serve_host_unknown", lambda t, r: (
          on_run("serve", r, serve_host="no-such-host.invalid"), ["serve_host"])),
      # Downstream task input (--mode=tasks): refused before the model loads or compiles.
      ("task_unknown_name", lambda t, r: (on_run("tasks", r, tasks="hellaswg"),
                                          ["'hellaswg'", "closest first: hellaswag"])),
      ("task_file_missing_field", lambda t, r: (
          on_run("tasks", r, tasks="piqa=" + _write(
              f"{t}/piqa.jsonl", '{"goal": "a", "sol1": "b", "label": 0}\n')),
          [f"{t}/piqa.jsonl", "'sol2'"])),
      ("task_label_out_of_range", lambda t, r: (
          on_run("tasks", r, tasks="mine=" + _write(
              f"{t}/mine.jsonl", '{"context": "a", "choices": ["b", "c"], "label": 2}\n')),
          [f"{t}/mine.jsonl", "label 2"])),
      ("task_file_empty", lambda t, r: (
          on_run("tasks", r, tasks="mine=" + _write(f"{t}/mine.jsonl", "")),
          [f"{t}/mine.jsonl"])),
      ("task_one_choice", lambda t, r: (
          on_run("tasks", r, tasks="mine=" + _write(
              f"{t}/mine.jsonl", '{"context": "a", "choices": ["b"], "label": 0}\n')),
          [f"{t}/mine.jsonl", "1 choice"])),
      ("tasks_dir_not_a_folder", lambda t, r: (on_run("tasks", r, tasks_dir=f"{t}/nope"),
                                               ["tasks_dir", f"{t}/nope"])),
      # Preference tuning (objective=dpo): the pairs and the reference, before anything loads.
      ("dpo_chosen_identical_to_rejected", lambda t, r: (
          train_new(t, r, objective="dpo", init_from=r["workdir"], dataset="text:" + _write(
              f"{t}/prefs.jsonl", '{"prompt": "a", "chosen": " b", "rejected": " c"}\n'
              '{"prompt": "a", "chosen": " b", "rejected": " b"}\n')),
          [f"{t}/prefs.jsonl:2", "'chosen' is identical to 'rejected'"])),
      ("dpo_records_without_preference_fields", lambda t, r: (
          train_new(t, r, objective="dpo", init_from=r["workdir"], dataset="text:" + _write(
              f"{t}/plain.jsonl", '{"text": "Kalo mine."}\n')),
          [f"{t}/plain.jsonl:1", "'chosen'", "'text'", "objective=dpo"])),
      ("dpo_on_plain_text_files", lambda t, r: (
          train_new(t, r, objective="dpo", init_from=r["workdir"]),
          [f"{r['root']}/text/train/0.txt", "no preference fields"])),
      ("dpo_full_finetune_without_a_reference", lambda t, r: (
          train_new(t, r, objective="dpo", lora_r=0), ["cannot compute a reference",
                                                      "--config.init_from", "lora_r"])),
      ("dpo_label_smoothing_with_ipo", lambda t, r: (
          est("--config.objective=dpo", "--config.dpo_loss_type=ipo",
              "--config.dpo_label_smoothing=0.1"), ["dpo_label_smoothing=0.1", "ipo"])),
      ("dpo_field_without_dpo", lambda t, r: (est("--config.dpo_beta=0.5"),
                                              ["dpo_beta=0.5", "objective"])),
      # Conversations (objective=sft, llm_jax/chat.py) and --mode=chat: refused before training.
      ("sft_no_assistant_turn", lambda t, r: (
          sft(t, r, _chats(t, [[USER]] * 3)), [f"{t}/chats.jsonl:1", "assistant"])),
      ("sft_unknown_role", lambda t, r: (
          sft(t, r, _chats(t, [[USER, ANSWER], [USER, {"role": "robot", "content": "x"}]])),
          [f"{t}/chats.jsonl:2", "'robot'", "system, user, assistant"])),
      ("sft_template_fails", lambda t, r: (
          sft(t, r, _chats(t, [[ANSWER]] * 3), chat_template=_write(
              f"{t}/t.jinja", "{% if messages[0]['role'] != 'user' %}{{ raise_exception("
              "'the first message must be the user') }}{% endif %}")),
          [f"{t}/chats.jsonl:", "the first message must be the user"])),
      ("sft_not_a_conversation", lambda t, r: (
          sft(t, r, _write(f"{t}/chats.jsonl", '{"text": "plain text"}\n')),
          [f"{t}/chats.jsonl:1", "'text'", "messages"])),
      ("sft_no_conversation_files", lambda t, r: (sft(t, r, f"{t}/none/*.jsonl"),
                                                  [f"{t}/none/*.jsonl"])),
      ("sft_chat_template_not_a_file", lambda t, r: (
          sft(t, r, _chats(t, [[USER, ANSWER]] * 4), chat_template=f"{t}/nope.jinja"),
          [f"chat_template='{t}/nope.jinja'"])),
      ("sft_imported_model_without_template", lambda t, r: (
          ["--mode=train", f"--workdir={t}/new", f"--config={BASE}",
           f"--config.init_from={_imported(t)}", "--config.objective=sft",
           f"--config.dataset={_chats(t, [[USER, ANSWER]] * 4)}",
           f"--config.data_dir={r['fields']['data_dir']}"],
          ["has no chat template", "--config.chat_template=chatml"])),
      ("train_on_prompt_without_sft", lambda t, r: (train_new(t, r, train_on_prompt=True),
                                                    ["train_on_prompt=True", "objective"])),
      ("chat_conversation_missing", lambda t, r: (
          ["--mode=chat", f"--workdir={r['workdir']}", f"--conversation={t}/conv.json"]
          + _flags(r["fields"]), [f"--conversation={t}/conv.json"])),
      ("chat_conversation_ends_with_the_reply", lambda t, r: (
          ["--mode=chat", f"--workdir={r['workdir']}", "--conversation=" + _write(
              f"{t}/conv.json", json.dumps({"messages": [USER, ANSWER]}))] + _flags(r["fields"]),
          [f"{t}/conv.json", "user message"])),
      ("task_continuation_longer_than_context", lambda t, r: (
          on_run("tasks", r, tasks="mine=" + _write(f"{t}/mine.jsonl", json.dumps(
              {"context": "a", "choices": ["b", "kalo mine " * 200], "label": 0}) + "\n")),
          ["'mine'", f"{t}/mine.jsonl", "longer than the context", "cannot be scored"])),
  ]


USER = {"role": "user", "content": "Kalo mine?"}
ANSWER = {"role": "assistant", "content": "Ruvi sato."}


def _chats(tmp, conversations):
  return _write(f"{tmp}/chats.jsonl", "".join(json.dumps({"messages": c}) + "\n"
                                              for c in conversations))


def _imported(tmp):
  """An imported Hugging Face model (the GPT-2 fixture: its tokenizer has no chat template)."""
  code = main.cli(["main.py", "--mode=import", f"--workdir={tmp}/gpt2",
                   f"--config.hf_path={ROOT}/tests/fixtures/hf/gpt2"])
  assert code == 0
  return f"{tmp}/gpt2"


_HELD = []  # listening sockets kept open for the test session


def _held_port():
  """A port some other server is listening on."""
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  s.listen()
  _HELD.append(s)
  return s.getsockname()[1]


CASES = _cases()


@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2(case, run, cli, tmp_path):
  before = _snapshot(run["workdir"])
  args, names = case(str(tmp_path), run)
  code, out = cli(*args)
  assert code == 2, out[-3000:]
  assert "error:" in out and "Traceback" not in out, out[-3000:]
  for name in names:
    assert name in out, (name, out[-3000:])
  assert _snapshot(run["workdir"]) == before
  assert not os.path.exists(tmp_path / "new")  # a refused training run leaves no workdir


def test_binary_files_get_advice_about_files_not_vocab_size(run, cli, tmp_path):
  d = _text_dir(str(tmp_path), "mixed", {"logo.png": bytes(range(256)) * 20})
  code, out = cli("--mode=train", f"--workdir={tmp_path}/new",
                  *_flags(run["fields"], validation="", dataset=f"text:{d}/*"))
  assert code == 2 and "logo.png" in out and "vocab_size" not in out, out[-3000:]


def test_there_are_at_least_40_cases():
  assert len(CASES) >= 40


# --- the workdir lock -------------------------------------------------------------------------


_HOLDER = """
import sys, time
from llm_jax import workdir
held = workdir.lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_second_training_run_on_a_held_workdir_is_refused_naming_the_holder(run, cli, tmp_path):
  workdir = str(tmp_path / "busy")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], stdout=subprocess.PIPE,
                            text=True, env=env)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with open(os.path.join(workdir, workdir_lib.LOCK_NAME), encoding="utf-8") as f:
      assert json.load(f)["pid"] == holder.pid
    code, out = cli("--mode=train", f"--workdir={workdir}", *_flags(run["fields"]))
    assert code == 2, out[-3000:]
    assert "in use by another training run" in out and "Traceback" not in out
    assert f"pid {holder.pid}" in out and socket.gethostname() in out
    assert os.listdir(workdir) == [workdir_lib.LOCK_NAME]  # it wrote nothing there
  finally:
    holder.kill()  # SIGKILL: the lock must not outlive its holder
    holder.wait(timeout=60)
  deadline = time.time() + 30
  while True:  # the kernel drops the lock when the process's files close
    try:
      with workdir_lib.lock(workdir):
        break
    except workdir_lib.WorkdirError:
      assert time.time() < deadline, "the lock outlived its SIGKILLed holder"
      time.sleep(0.1)


# --- the other exit codes ---------------------------------------------------------------------


def test_out_of_memory_exits_3_and_a_bug_exits_4_with_its_traceback(cli, monkeypatch):
  from llm_jax import sizing

  def oom(cfg):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes")
  monkeypatch.setattr(sizing, "estimate", oom)
  code, out = cli("--mode=estimate", f"--config={BASE}")
  assert code == 3 and "error: out of memory" in out and "micro_batch_size" in out, out

  def bug(cfg):
    raise KeyError("a bug")
  monkeypatch.setattr(sizing, "estimate", bug)
  code, out = cli("--mode=estimate", f"--config={BASE}")
  assert code == 4 and "Traceback" in out and "error: internal error (KeyError)" in out, out


def test_batch_size_alone_derives_micro_batch_size(cli):
  code, out = cli("--mode=estimate", f"--config={BASE}", "--config.batch_size=64",
                  "--config.gradient_accumulation_steps=4")
  assert code == 0, out[-3000:]
  assert "our count at micro_batch_size=16" in out


def test_estimate_of_a_deep_model_answers_at_once(cli):
  # Found by tests/test_config_fuzz.py: the parameter count traced every block unrolled, 23 s for
  # 200 layers (and minutes for thousands); the blocks are traced scanned now.
  import re  # pylint: disable=import-outside-toplevel
  totals = {}
  for layers in (1, 2, 4096):
    start = time.perf_counter()
    code, out = cli("--mode=estimate", f"--config={BASE}", f"--config.n_layers={layers}")
    assert code == 0 and time.perf_counter() - start < 10, out[-3000:]
    totals[layers] = int(re.search(r"total\s+([\d,]+)", out).group(1).replace(",", ""))
  per_block = totals[2] - totals[1]  # the count is linear in the depth
  assert totals[4096] == totals[1] + 4095 * per_block


def test_fields_a_mode_does_not_read_are_warned(cli):
  code, out = cli("--mode=estimate", f"--config={BASE}", "--config.learning_rate=1e-3",
                  "--config.temperature=0.5", "--prompt=hi")
  assert code == 0, out[-3000:]
  assert ("warning: --config.learning_rate, --config.temperature do nothing in --mode=estimate"
          in out)
  assert "warning: --prompt does nothing in --mode=estimate" in out
  _, warnings = config.mode_problems(config.load(BASE, eval_batches=4), "eval", ["eval_batches"])
  assert warnings and "whole validation split" in warnings[0]
