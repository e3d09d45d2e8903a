"""Hugging Face import and export against what transformers computes.

The fixtures in tests/fixtures/hf/ (tiny random GPT-2, Llama with GQA and llama3 RoPE scaling,
Qwen2 with q/k/v biases) and their reference logits, greedy continuations and tokenizer ids were
made by transformers (tests/fixtures/make_hf_fixtures.py): the test environment has no torch.
`pytest -m hf` (the live test) makes fresh ones with the installed transformers and also loads
llm_jax's exports back into it.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import helpers  # tests/helpers.py
from configs import base
from llm_jax import attention
from llm_jax import checkpoint
from llm_jax import config
from llm_jax import hf
from llm_jax import hf_tokenizer
from llm_jax import model as model_lib
from llm_jax import sampling
from llm_jax import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
NAMES = ("gpt2", "llama", "qwen2")


def _import(directory, **overrides):
  """As --mode=import --config.<k>=<v>...: the overrides are in the config and named."""
  raw = base.get_config()
  raw.update(overrides)
  cfg = hf.import_config(raw, hf.read_config(directory), overrides)
  params, mc = hf.load_params(directory, cfg)
  return cfg, params, mc


def _reference(directory):
  with open(os.path.join(directory, "reference.json"), encoding="utf-8") as f:
    ref = json.load(f)
  return ref, load_file(os.path.join(directory, "reference.safetensors"))["logits"]


def check_logits_and_greedy(directory):
  """Imported logits == transformers' (fp32 tolerance); greedy decoding == its generate()."""
  cfg, params, mc = _import(directory)
  ref, logits_ref = _reference(directory)
  logits = jax.jit(model_lib.Transformer(mc).apply)({"params": params},
                                                     np.asarray(ref["input_ids"]))
  np.testing.assert_allclose(np.asarray(logits)[..., :mc.vocab_size], logits_ref, atol=1e-4,
                             rtol=1e-4)
  tok = hf_tokenizer.from_hf_dir(directory)
  new = sampling.generate(params, mc, [ref["prompt_ids"]], cfg, jax.random.key(0),
                          eos_id=tok.eos_ids, do_sample=False, max_new_tokens=len(
                              ref["greedy_ids"]))[0]
  assert new == ref["greedy_ids"][:len(new)] and (
      len(new) == len(ref["greedy_ids"]) or new[-1] in tok.eos_ids)
  return cfg, params, mc, tok


def check_tokenizer(directory, tok=None):
  """Our tokenizer of the directory encodes / decodes as AutoTokenizer did."""
  ref, _ = _reference(directory)
  tok = tok or hf_tokenizer.from_hf_dir(directory)
  for text, ids, plain, decoded in zip(ref["texts"], ref["encoded"], ref["encoded_plain"],
                                       ref["decoded"]):
    assert tok.encode(text) == plain, text
    assert tok.encode(text, add_bos=tok.add_bos) == ids, text
    assert tok.decode(plain) == decoded
  assert tok.encode(ref["texts"]) == ref["encoded_plain"]  # batched


def check_export_roundtrip(directory, params, mc, tok, out):
  """Export: the tensors and config of the original; import of the export: the same params."""
  files = hf.export(mc, params, tok, out, max_shard_bytes=30_000)
  assert "model.safetensors.index.json" in files  # small shards: the sharded writer is exercised
  original = hf.tensor_index(directory)
  exported = hf.tensor_index(out)
  ignored = {k for k in original if hf._IGNORED.search(k)}  # pylint: disable=protected-access
  assert set(exported) == set(original) - ignored
  for name, (path, shape, _) in exported.items():
    with safe_open(path, "numpy") as f, safe_open(original[name][0], "numpy") as g:
      a, b = f.get_tensor(name), g.get_tensor(name).astype(np.float32)
    assert a.shape == tuple(shape) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b, err_msg=name)
  want, got = hf.read_config(directory), hf.read_config(out)
  keys = set(want) & set(got) - {"dtype", "transformers_version", "attn_pdrop", "embd_pdrop",
                                 "resid_pdrop", "attention_dropout", "pad_token_id", "n_inner",
                                 "eos_token_id", "max_window_layers"}
  assert keys >= {"model_type", "architectures", "vocab_size", "tie_word_embeddings"}
  assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
  gen = lambda d: json.load(open(os.path.join(d, "generation_config.json"), encoding="utf-8"))
  assert gen(out)["eos_token_id"] == gen(directory)["eos_token_id"]
  assert hf.model_fields(got) == hf.model_fields(want)  # rope_parameters vs rope_theta/scaling
  _, params2, mc2 = _import(out)
  assert mc2 == mc
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, params2)
  check_tokenizer(directory, hf_tokenizer.from_hf_dir(out))  # the exported tokenizer files


@pytest.fixture(scope="module", params=NAMES)
def imported(request):
  directory = os.path.join(FIXTURES, request.param)
  return directory, check_logits_and_greedy(directory)


def test_imported_logits_and_greedy_tokens_match_transformers(imported):
  directory, (cfg, _, mc, tok) = imported
  name = os.path.basename(directory)
  assert (mc.position_embedding, mc.use_rms_norm, mc.has_qkv_bias, mc.use_bias) == {
      "gpt2": ("learned", False, True, True), "llama": ("rope", True, False, False),
      "qwen2": ("rope", True, True, False)}[name]
  assert cfg.block_size == min(cfg.max_seq_len, hf.DEFAULT_BLOCK_SIZE)
  if name == "qwen2":  # two generation EOS ids, a tokenizer smaller than the embedding
    assert tok.eos_ids == [302, 300] and tok.vocab_size < mc.vocab_size


def test_ids_past_a_smaller_tokenizer_decode_to_nothing_as_the_tokenizers_library_does():
  # Qwen2's embedding is larger than its tokenizer: the sampler can pick an id with no piece
  # (--mode=sample of the imported fixture did, and ended in exit 4). The tokenizers library,
  # and so transformers, decodes such an id to nothing.
  import tokenizers  # pylint: disable=g-import-not-at-top
  directory = os.path.join(FIXTURES, "qwen2")
  tok = hf_tokenizer.from_hf_dir(directory)
  ref = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
  ids = [40, 41, tok.vocab_size, 42, tok.vocab_size + 15]
  assert tok.decode(ids) == ref.decode(ids) == ref.decode([40, 41, 42]) != ""
  assert tok.decode([ids, ids[:2]]) == [tok.decode(ids), tok.decode(ids[:2])]


@pytest.mark.parametrize("name", NAMES)
def test_tokenizers_encode_and_decode_like_transformers(name):
  check_tokenizer(os.path.join(FIXTURES, name))


def test_export_then_import_is_identity(imported, tmp_path):
  directory, (_, params, mc, tok) = imported
  check_export_roundtrip(directory, params, mc, tok, str(tmp_path / "export"))


def test_llama_scanned_bf16_import_and_export_keep_the_bf16_weights_exactly(tmp_path):
  directory = os.path.join(FIXTURES, "llama")
  _, params, _ = _import(directory)
  _, sparams, smc = _import(directory, scan_layers=True, param_dtype="bfloat16")
  assert sparams["layers"]["attn"]["query"]["kernel"].dtype == np.dtype("bfloat16")
  # The fixture's weights are bfloat16 on disk: stacking them in bfloat16 loses nothing.
  np.testing.assert_array_equal(
      np.asarray(sparams["layers"]["mlp"]["wo"]["kernel"][1], np.float32),
      np.asarray(params["blocks_1"]["mlp"]["wo"]["kernel"]))
  out = str(tmp_path / "export")
  hf.export(smc, sparams, hf_tokenizer.from_hf_dir(directory), out)
  original, exported = hf.tensor_index(directory), hf.tensor_index(out)
  assert set(original) == set(exported)
  for name, (path, _, dtype) in exported.items():
    assert dtype == "BF16"
    with safe_open(path, "numpy") as f, safe_open(original[name][0], "numpy") as g:
      np.testing.assert_array_equal(f.get_tensor(name), g.get_tensor(name), err_msg=name)


def test_sharded_import_places_every_param_in_its_sharding():
  """On 4 CPU devices with FSDP: the import's arrays carry the Trainer's shardings and give
  transformers' logits (a subprocess: the device count is fixed when jax starts)."""
  script = f"""
import json, sys
sys.path.insert(0, {ROOT!r})
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)
import numpy as np
from configs import base
from llm_jax import hf, model, train
from safetensors.numpy import load_file
d = {os.path.join(FIXTURES, "llama")!r}
raw = base.get_config()
raw.mesh_shape = (1, 4, 1)
cfg = hf.import_config(raw, hf.read_config(d))
params, mc = hf.load_params(d, cfg)
want = train.Trainer(cfg, 1).param_shardings
same = jax.tree.leaves(jax.tree.map(lambda p, s: p.sharding == s, params, want))
emb = params["embed"]["embedding"]
ref = json.load(open(d + "/reference.json"))
logits_ref = load_file(d + "/reference.safetensors")["logits"]
logits = jax.jit(model.Transformer(mc).apply)({{"params": params}}, np.asarray(ref["input_ids"]))
print(json.dumps({{"same": all(same), "shard": list(emb.addressable_shards[0].data.shape),
                  "full": list(emb.shape),
                  "err": float(np.abs(np.asarray(logits)[..., :320] - logits_ref).max())}}))
"""
  env = helpers.child_env()
  p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["same"] and out["shard"] == [out["full"][0], out["full"][1] // 4], out
  assert out["err"] < 1e-4, out


def test_cli_import_then_sample_uses_the_models_eos_and_refuses_train(tmp_path, capsys):
  """main.py --mode=import writes an ordinary workdir; --mode=sample needs only --workdir."""
  workdir = str(tmp_path / "gpt2")
  env = helpers.child_env()
  run = lambda *args: subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=300, check=False)
  p = run("--mode=import", f"--config.hf_path={os.path.join(FIXTURES, 'gpt2')}",
          f"--workdir={workdir}")
  assert p.returncode == 0, p.stdout + p.stderr
  assert checkpoint.imported_from(workdir) == os.path.join(FIXTURES, "gpt2")
  saved = checkpoint.saved_config(workdir)
  assert (saved["d_model"], saved["position_embedding"], saved["vocab_size"]) == (
      32, "learned", 300)
  # --mode=sample's path, in-process (a second main.py run would compile for ~10 s more).
  ref, _ = _reference(os.path.join(FIXTURES, "gpt2"))
  raw = base.get_config()
  raw.update(do_sample=False, max_new_tokens=len(ref["greedy_ids"]))
  cfg = config.finalize(raw)
  import main  # pylint: disable=g-import-not-at-top
  assert main.sample(cfg, workdir, ["The quick brown fox"]) == 0
  tok = hf_tokenizer.from_hf_dir(os.path.join(FIXTURES, "gpt2"))
  assert "The quick brown fox" + tok.decode(ref["greedy_ids"]) in capsys.readouterr().out
  p = run("--mode=train", f"--workdir={workdir}")
  assert p.returncode == 2 and f"--config.init_from={workdir}" in p.stderr
  assert sorted(os.listdir(workdir)) == ["checkpoints"]  # the refused run wrote nothing


# ------------------------------------------------------------------------------- bad input


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  return str(dst)


def _refused(hf_path, tmp_path, *needles):
  workdir = str(tmp_path / "workdir")
  with pytest.raises(hf.HFError) as e:
    hf.import_to_workdir(base.get_config(), hf_path, workdir)
  for needle in needles:
    assert needle in str(e.value), str(e.value)
  assert not os.path.exists(workdir)


def test_bad_directories_are_refused_before_anything_is_written(tmp_path):
  _refused(str(tmp_path), tmp_path, "no config.json")
  llama = _copy("llama", tmp_path)
  os.remove(os.path.join(llama, "model-00002-of-00002.safetensors"))
  _refused(llama, tmp_path, "model-00002-of-00002.safetensors", "missing")
  gpt2 = _copy("gpt2", tmp_path)
  path = os.path.join(gpt2, "model.safetensors")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-1000])
  _refused(gpt2, tmp_path, "model.safetensors", "truncated")
  qwen2 = _copy("qwen2", tmp_path)
  with open(os.path.join(qwen2, "config.json"), encoding="utf-8") as f:
    c = json.load(f)
  c["intermediate_size"] = 48
  with open(os.path.join(qwen2, "config.json"), "w", encoding="utf-8") as f:
    json.dump(c, f)
  _refused(qwen2, tmp_path, "model.layers.0.mlp.gate_proj.weight", "[64, 32]", "[48, 32]")
  c["model_type"] = "gpt_neox"
  with open(os.path.join(qwen2, "config.json"), "w", encoding="utf-8") as f:
    json.dump(c, f)
  _refused(qwen2, tmp_path, "model_type='gpt_neox'")
  os.remove(os.path.join(llama, "tokenizer.model"))
  _refused(llama, tmp_path, "no tokenizer.json or tokenizer.model")


def test_import_refuses_a_workdir_with_checkpoints_and_arch_overrides(tmp_path):
  workdir = tmp_path / "w"
  (workdir / "checkpoints" / "100").mkdir(parents=True)
  with pytest.raises(hf.HFError, match="already holds checkpoints"):
    hf.import_to_workdir(base.get_config(), os.path.join(FIXTURES, "gpt2"), str(workdir))
  assert os.listdir(workdir / "checkpoints") == ["100"]
  with pytest.raises(hf.HFError, match="d_model"):
    hf.import_config(base.get_config(), hf.read_config(os.path.join(FIXTURES, "gpt2")),
                     {"d_model": 64})


LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
         "max_position_embeddings": 256}


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "gemma"}, "model_type='gemma'"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4}}, "rope_type='longrope'"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64,
      "max_window_layers": 1}, "layer_types mixes sliding and full attention"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"use_parallel_residual": True}, "use_parallel_residual=True"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
])
def test_unmappable_configs_are_refused_naming_the_field(change, needle):
  with pytest.raises(hf.HFError) as e:
    hf.model_fields({**LLAMA, **change})
  assert needle in str(e.value)


def test_config_mapping_reads_both_transformers_spellings():
  v4 = hf.model_fields({**LLAMA, "rope_theta": 5e5, "num_key_value_heads": 2, "head_dim": 32,
                        "rope_scaling": {"type": "linear", "factor": 2.0}})
  v5 = hf.model_fields({**LLAMA, "num_key_value_heads": 2, "head_dim": 32, "rope_parameters": {
      "rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
  assert v4 == v5
  assert (v4["rope_theta"], v4["rope_scaling"], v4["rope_scaling_factor"], v4["d_k"],
          v4["n_kv_heads"]) == (5e5, "linear", 2.0, 32, 2)
  # Mistral imports with its sliding window (none needed when the context fits in it).
  mistral = {**LLAMA, "model_type": "mistral", "sliding_window": 128}
  assert hf.model_fields(mistral)["sliding_window"] == 128
  assert hf.model_fields(mistral, max_seq_len=128)["sliding_window"] is None
  gpt2 = hf.model_fields({"model_type": "gpt2", "activation_function": "gelu", "n_embd": 64,
                          "n_head": 4, "vocab_size": 100})
  assert (gpt2["activation"], gpt2["d_ff"], gpt2["max_position_embeddings"]) == (
      "gelu_exact", 256, 1024)


# -------------------------------------------------------------------------------- export


EXPORTABLE = model_lib.ModelConfig(vocab_size=100, d_model=32, n_heads=4, n_kv_heads=4,
                                   n_layers=1, d_ff=64, d_k=8, d_v=8)


@pytest.mark.parametrize("change, family, needles", [
    ({"position_embedding": "learned"}, "gpt2", ()),
    ({"activation": "swiglu", "use_rms_norm": True, "use_bias": False}, "llama", ()),
    ({"activation": "swiglu", "use_rms_norm": True, "use_bias": False, "qkv_bias": True},
     "qwen2", ()),
    ({}, None, ("Nearest: gpt2, which needs position_embedding 'rope' -> 'learned'.",)),
    ({"position_embedding": "sinusoidal"}, None, ("position_embedding 'sinusoidal' ->",)),
    ({"activation": "swiglu", "use_rms_norm": True, "d_v": 16}, None,
     ("Nearest: llama, which needs d_v 16 -> 8.",)),
])
def test_export_family_or_a_refusal_naming_the_fields(change, family, needles):
  mc = dataclasses.replace(EXPORTABLE, **change)
  if family:
    assert hf.export_family(mc) == family
    return
  with pytest.raises(hf.HFError) as e:
    hf.export_family(mc)
  for needle in needles:
    assert needle in str(e.value), str(e.value)


# ------------------------------------------------------------------- new model fields


def test_linear_rope_scaling_is_position_interpolation():
  """RoPE with linear factor s at position p == unscaled RoPE at position p / s."""
  x = np.random.default_rng(0).normal(size=(1, 6, 2, 8)).astype(np.float32)
  pos = np.arange(6)[None] * 3.0
  scaled = attention.rope(x, pos, 1e4, attention.rope_frequencies(8, 1e4, "linear", 3.0))
  np.testing.assert_allclose(scaled, attention.rope(x, pos / 3.0, 1e4), atol=1e-6)


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
  base_f = attention.rope_frequencies(64, 5e5)
  f = attention.rope_frequencies(64, 5e5, "llama3", 8.0, 1.0, 4.0, 8192)
  wavelen = 2 * np.pi / base_f
  high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
  np.testing.assert_array_equal(f[high], base_f[high])
  np.testing.assert_allclose(f[low], base_f[low] / 8, rtol=1e-6)
  mid = ~high & ~low
  assert mid.any() and np.all((f[mid] < base_f[mid]) & (f[mid] > base_f[mid] / 8))


def test_gelu_exact_is_the_erf_gelu():
  from math import erf
  from llm_jax import layers
  mc = dataclasses.replace(EXPORTABLE, activation="gelu_exact", use_bias=False)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 32)).astype(np.float32)
  wi, wo = rng.normal(size=(32, 64)).astype(np.float32), rng.normal(size=(64, 32)).astype(
      np.float32)
  y = layers.Mlp(mc).apply({"params": {"wi": {"kernel": wi}, "wo": {"kernel": wo}}}, x)
  h = x @ wi
  want = (0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))) @ wo
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------- tokenizer items


CORPUS = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
          "In 1984, there were 12 months;  two  spaces\tand tabs\n\nand lines.",
          "The quick brown fox jumps over the lazy dog.", "All the world's a stage, and all the "
          "men and women merely players; they have their exits and their entrances."] * 30


def test_tokenizer_items_round_trip_and_old_items_are_sentencepiece(tmp_path):
  own = tokenizer_lib.train_tokenizer(CORPUS, vocab_size=320)
  old_item = {"model": own.to_item()["model"]}  # as checkpoints before "kind" wrote it
  assert tokenizer_lib.from_item(old_item).encode("to be") == own.encode("to be")
  assert own.to_item()["kind"] == "sentencepiece" and own.is_own
  for name in NAMES:
    tok = hf_tokenizer.from_hf_dir(os.path.join(FIXTURES, name))
    back = tokenizer_lib.from_item(json.loads(json.dumps(tok.to_item())))
    path = str(tmp_path / f"{name}.tok")
    tokenizer_lib.save(tok, path)
    loaded = tokenizer_lib.load(path)
    for t in (back, loaded):
      assert (t.kind, t.eos_ids, t.bos_id, t.add_bos, t.encode("Hello there")) == (
          tok.kind, tok.eos_ids, tok.bos_id, tok.add_bos, tok.encode("Hello there"))
    assert tok.fingerprint == back.fingerprint != own.fingerprint
  assert tokenizer_lib.load(os.path.join(FIXTURES, "gpt2", "tokenizer.json")).eos_id == 0


def test_own_sentencepiece_tokenizer_exports_to_an_equal_tokenizer_json():
  """Unigram and BPE models trained here, converted to tokenizer.json: the tokenizers library
  gives sentencepiece's ids and text back (sentencepiece is the reference)."""
  import tokenizers
  ref, _ = _reference(os.path.join(FIXTURES, "llama"))
  texts = ref["texts"] + CORPUS[:3] + ["  leading spaces", "x", ""]
  for model_type in ("unigram", "bpe"):
    own = tokenizer_lib.train_tokenizer(CORPUS, vocab_size=320, model_type=model_type)
    tk = tokenizers.Tokenizer.from_str(hf_tokenizer.sentencepiece_to_tokenizer_json(
        own.model_proto))
    for text in texts:
      ids = tk.encode(text, add_special_tokens=False).ids
      assert ids == own.encode(text), (model_type, text)
      assert tk.decode(ids, skip_special_tokens=True) == own.decode(ids) == text


# ----------------------------------------------------------------------------- live test


def _hf_python():
  env = os.environ.get("LLM_JAX_HF_PYTHON")
  if env:
    return env
  try:
    import torch  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    import transformers  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  except ImportError:
    return None
  return sys.executable


@pytest.mark.hf
def test_live_against_the_installed_transformers(tmp_path):
  """Fresh random models from the installed transformers; import, compare, export, and load the
  exports back into transformers (also an llm_jax model with its own sentencepiece tokenizer)."""
  python = _hf_python()
  if python is None:
    pytest.skip("needs torch and transformers: install them here, or point LLM_JAX_HF_PYTHON at "
                "a Python that has them (e.g. /tmp/hfvenv/bin/python)")
  script = os.path.join(ROOT, "tests", "fixtures", "make_hf_fixtures.py")
  root = tmp_path / "fixtures"
  subprocess.run([python, script, str(root)], check=True, timeout=900, capture_output=True)
  for name in NAMES:
    directory = str(root / name)
    check_tokenizer(directory)
    _, params, mc, tok = check_logits_and_greedy(directory)
    out = str(tmp_path / f"{name}_export")
    check_export_roundtrip(directory, params, mc, tok, out)
    _check_in_transformers(python, script, out, directory, tmp_path)
  # A model trained here (our own sentencepiece tokenizer, no Hugging Face origin).
  ref_dir = str(root / "llama")
  own = tokenizer_lib.train_tokenizer(CORPUS, vocab_size=320)
  _, params, mc = _import(ref_dir)
  out = str(tmp_path / "own_export")
  hf.export(mc, params, own, out)
  got = _check_in_transformers(python, script, out, ref_dir, tmp_path, tokenizer=False)
  ref, _ = _reference(ref_dir)
  assert got["encoded_plain"] == [own.encode(t) for t in ref["texts"]]
  assert got["decoded"] == ref["texts"]


def _check_in_transformers(python, script, out, ref_dir, tmp_path, tokenizer=True):
  result = str(tmp_path / "check.json")
  subprocess.run([python, script, "--check", out, ref_dir, result], check=True, timeout=600,
                 capture_output=True)
  with open(result, encoding="utf-8") as f:
    got = json.load(f)
  ref, logits_ref = _reference(ref_dir)
  np.testing.assert_allclose(np.asarray(got["logits"]), logits_ref, atol=1e-4, rtol=1e-4)
  if tokenizer:
    assert (got["encoded"], got["encoded_plain"], got["decoded"]) == (
        ref["encoded"], ref["encoded_plain"], ref["decoded"])
  return got


def test_data_pipeline_uses_the_imported_tokenizer(tmp_path):
  """Fine-tuning data: documents encoded by the model's tokenizer, each opened by its BOS (Llama
  adds one) and closed by its EOS; packed segments start at that EOS."""
  from llm_jax import config as config_lib
  from llm_jax import data
  docs = [f"Document {i}: " + " ".join(CORPUS[i % 5:i % 5 + 3]) for i in range(24)]
  for i, doc in enumerate(docs):
    (tmp_path / "train").mkdir(exist_ok=True)
    (tmp_path / "train" / f"d{i:02d}.txt").write_text(doc)
  tok = hf_tokenizer.from_hf_dir(os.path.join(FIXTURES, "llama"))
  cfg = config_lib.load(os.path.join(ROOT, "configs", "base.py"), vocab_size=320,
                        dataset=f"text:{tmp_path}/train", data_dir=str(tmp_path / "cache"),
                        max_seq_len=16, micro_batch_size=2, pack_segments=True)
  d = data.build(cfg, None, 0, 1, tokenizer=tok)
  stream = np.concatenate([np.asarray(d.train_tokens), np.asarray(d.validation_tokens)])
  want = [t for doc in docs for t in [1] + tok.encode(doc) + [2]]
  assert sorted(stream.tolist()) == sorted(want) and stream[0] == 1  # documents in some order
  batch = next(d.train_iter())
  seg, _ = data.segments(batch["inputs"][0], eos_id=2)
  np.testing.assert_array_equal(batch["segment_ids"][0], seg)
  assert (np.diff(seg, axis=-1) > 0).sum() == (batch["inputs"][0][:, 1:] == 2).sum()
