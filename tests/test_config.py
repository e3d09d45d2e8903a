"""Config validation and derived fields: each invalid config is refused naming its field."""

import glob
import os

import pytest

from llm_jax import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "base.py")

# (overrides, the field the message must name)
INVALID = [
    ({"n_heads": 7}, "n_heads"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"block_size": 512}, "block_size"),  # > max_seq_len=256
    ({"position_embedding": "learned", "max_position_embeddings": 64}, "max_position_embeddings"),
    ({"batch_size": 30, "micro_batch_size": 8, "gradient_accumulation_steps": 4}, "batch_size"),
    ({"dropout": 1.0}, "dropout"),
    ({"attention_dropout": -0.1}, "attention_dropout"),
    ({"hidden_dropout": 1.5}, "hidden_dropout"),
    ({"dtype": "float64"}, "dtype"),
    ({"lr_decay": "step"}, "lr_decay"),
    ({"activation": "tanh"}, "activation"),
    ({"position_embedding": "alibi"}, "position_embedding"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"num_beams": 0}, "num_beams"),
    ({"min_length": 300, "max_new_tokens": 200}, "min_length"),
    ({"load_in_8bit": True, "load_in_4bit": True}, "load_in_8bit and load_in_4bit"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"beta2": 1.0}, "beta2"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"mesh_shape": (-1, -1, 1)}, "mesh_shape"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"remat_policy": "some"}, "remat_policy"),
    ({"num_beams": 4, "do_sample": True}, "num_beams"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"d_k": 33}, "d_k"),
    ({"optimizer": "adam"}, "optimizer"),
    ({"decay_fraction": 0.0}, "decay_fraction"),
    ({"momentum": 1.0}, "momentum"),
    ({"muon_learning_rate": 0.0}, "muon_learning_rate"),
    ({"muon_momentum": -0.5}, "muon_momentum"),
    ({"muon_ns_steps": 0}, "muon_ns_steps"),
    ({"muon_consistent_rms": -0.2}, "muon_consistent_rms"),
    ({"adafactor_decay_rate": 1.5}, "adafactor_decay_rate"),
    ({"adafactor_clipping_threshold": -1.0}, "adafactor_clipping_threshold"),
    ({"adafactor_momentum": 1.0}, "adafactor_momentum"),
    ({"adafactor_min_dim_size_to_factor": 0}, "adafactor_min_dim_size_to_factor"),
    ({"weight_lr_power": -1.0}, "weight_lr_power"),
    ({"beta1": 0.0, "optimizer": "schedule_free_adamw"}, "beta1"),
    ({"serve_slots": 0}, "serve_slots"),
    ({"serve_max_n": 16, "serve_max_queue": 8}, "serve_max_n"),
    ({"serve_api_key": " "}, "serve_api_key"),
]


@pytest.mark.parametrize("overrides,field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_config_names_its_field(overrides, field):
  with pytest.raises(config.ConfigError) as e:
    config.load(BASE, **overrides)
  assert field in str(e.value)
  bad_value = next(iter(overrides.values()))
  assert str(bad_value) in str(e.value) or "both True" in str(e.value)


def test_all_problems_reported_at_once():
  with pytest.raises(config.ConfigError) as e:
    config.load(BASE, n_heads=7, top_p=0.0, dropout=2.0, dtype="fp8")
  assert len(e.value.problems) == 4
  for field in ("n_heads", "top_p", "dropout", "dtype"):
    assert any(field in p for p in e.value.problems)


def test_derived_fields_follow_overrides_and_explicit_values_win():
  c = config.load(BASE, d_model=512, n_heads=8, max_seq_len=64)
  assert (c.d_k, c.d_v, c.d_ff, c.n_kv_heads) == (64, 64, 2048, 8)
  assert c.block_size == c.max_position_embeddings == 64
  c = config.load(BASE, d_model=512, n_heads=8, d_k=32, d_ff=100, block_size=16)
  assert (c.d_k, c.d_v, c.d_ff, c.block_size) == (32, 32, 100, 16)
  # explicit d_k lifts the divisibility requirement on d_model / n_heads
  assert config.load(BASE, d_model=100, n_heads=3, d_k=32).d_k == 32


def test_batch_size_derivation():
  c = config.load(BASE, micro_batch_size=8, gradient_accumulation_steps=4)
  assert c.batch_size == 32
  c = config.load(BASE, batch_size=64, micro_batch_size=None, gradient_accumulation_steps=4)
  assert c.micro_batch_size == 16


def test_config_is_locked_after_finalize():
  c = config.load(BASE)
  with pytest.raises(AttributeError):
    c.new_field = 1


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                                        if not p.endswith("__init__.py")))
def test_every_shipped_config_is_valid(path):
  c = config.load(path)
  assert c.batch_size == c.micro_batch_size * c.gradient_accumulation_steps


def test_flash_attention_falls_back_with_a_warning(caplog):
  c = config.load(BASE, use_flash_attention=True, dtype="float32")
  assert config.flash_attention_backend(c, "gpu") == "xla"
  assert "bfloat16" in caplog.text
  c = config.load(BASE, use_flash_attention=True, dtype="bfloat16")
  assert config.flash_attention_backend(c, "gpu") == "cudnn"
  assert config.flash_attention_backend(c, "cpu") == "xla"
  assert config.flash_attention_backend(c, "tpu") == "pallas"


def test_reference_sheet_variables_are_all_fields():
  names = """d_model n_heads n_layers d_ff vocab_size max_seq_len block_size learning_rate warmup_steps
  lr_decay batch_size micro_batch_size gradient_accumulation_steps beta1 beta2 epsilon weight_decay
  max_grad_norm temperature top_k top_p repetition_penalty num_beams length_penalty max_new_tokens
  min_length do_sample d_k d_v max_position_embeddings rope_theta attention_dropout use_cache dropout
  hidden_dropout layer_norm_eps use_rms_norm use_flash_attention load_in_8bit load_in_4bit lora_r
  lora_alpha lora_dropout num_train_epochs save_steps eval_steps dtype save_every_epochs""".split()
  c = config.load(BASE)
  assert [n for n in names if n not in c] == []


def test_readme_lists_every_field_as_configs_base_defines_it():
  import importlib.util
  spec = importlib.util.spec_from_file_location("config_table",
                                                os.path.join(ROOT, "scripts", "config_table.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  table = mod.table(BASE)
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert table in readme, "README's field table is stale: regenerate with scripts/config_table.py"
  documented = {r[0] for r in mod.rows(BASE)}
  assert documented == set(config.load(BASE).keys())
