"""Corpora at scale, on small generated files: every format streams to the same tokens, the
parallel build equals the serial one, an interrupted build resumes from its finished units, the
packed-row sampler over many shards equals the one over their concatenation, mixtures, the
fixed evaluation sample, and bad input.

References are independent: the token stream from each document's own encoding, rows by plain
slicing of the concatenated shards.
"""

import gzip
import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llm_jax import config, data, sources, tokens, tokenizer

from test_data import BASE, make_docs, stream_of

DOCS = make_docs(11, 120)


def _cfg(tmp, **kw):
  fields = dict(data_dir=str(tmp / "cache"), tokenizer_path=str(TOK_PATH), vocab_size=320,
                max_seq_len=16, micro_batch_size=4, prefetch=0, validation_fraction=0.1)
  fields.update(kw)
  return config.load(BASE, **fields)


TOK_PATH = None


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
  """The same 120 documents in every format, and one tokenizer trained on them."""
  global TOK_PATH
  d = tmp_path_factory.mktemp("formats")
  jl = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(DOCS)).encode()
  (d / "a.jsonl").write_bytes(jl)
  (d / "a.jsonl.gz").write_bytes(gzip.compress(jl))
  (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jl))
  pq.write_table(pa.Table.from_pylist([{"text": t, "n": i} for i, t in enumerate(DOCS)]),
                 d / "a.parquet", row_group_size=17)
  datasets.Dataset.from_list([{"text": t} for t in DOCS]).save_to_disk(
      str(d / "disk"), max_shard_size="4KB")
  (d / "txt").mkdir()
  for i, t in enumerate(DOCS):
    (d / "txt" / f"{i:03d}.txt").write_text(t + "\n")
  TOK_PATH = d / "tok.model"
  data.build(_cfg(d, dataset=f"text:{d}/a.jsonl"), None, 0, 1)  # trains and saves the tokenizer
  return d


def _docs_of(d, split):
  """Documents of a built Data's split, decoded from the stream between EOS tokens."""
  s = np.asarray(d.train_tokens if split == "train" else d.validation_tokens)
  ends = np.flatnonzero(s == tokenizer.EOS_ID)
  return [d.tokenizer.decode(x) for x in np.split(s, ends + 1)[:-1]]


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.jsonl.zst", "a.parquet", "disk", "txt"])
def test_every_format_gives_the_same_tokens(corpus_files, name, tmp_path):
  ref = data.build(_cfg(tmp_path, dataset=f"text:{corpus_files}/a.jsonl"), None, 0, 1)
  got = data.build(_cfg(tmp_path, dataset=f"text:{corpus_files}/{name}"), None, 0, 1)
  np.testing.assert_array_equal(np.asarray(got.train_tokens), np.asarray(ref.train_tokens))
  np.testing.assert_array_equal(np.asarray(got.validation_tokens),
                                np.asarray(ref.validation_tokens))
  # The rule holds out every 10th document, from the first: exact, from the index alone.
  val = [t for j, t in enumerate(DOCS) if sources.is_validation(0, [j], 0.1)[0]]
  assert val == DOCS[::10]
  np.testing.assert_array_equal(np.asarray(ref.validation_tokens), stream_of(ref.tokenizer, val))
  np.testing.assert_array_equal(np.asarray(ref.train_tokens), stream_of(
      ref.tokenizer, [t for t in DOCS if t not in val]))


def test_parallel_build_equals_serial_and_reads_as_one_stream(corpus_files, tmp_path,
                                                              monkeypatch):
  monkeypatch.setattr(sources, "UNIT_BYTES", 3000)  # ~8 units of the 24 kB file
  serial = data.build(_cfg(tmp_path, dataset=f"text:{corpus_files}/a.jsonl",
                           tokenize_workers=1), None, 0, 1)
  monkeypatch.setattr(tokens, "POOL_MIN_BYTES", 0)
  par = data.build(_cfg(tmp_path, dataset=f"text:{corpus_files}/a.jsonl", tokenize_workers=2,
                        data_dir=str(tmp_path / "cache2")), None, 0, 1)
  assert len(par.meta["train"]["shards"]) >= 6
  for split in ("train", "validation"):
    a = np.asarray(getattr(serial, f"{split}_tokens"))
    b = np.asarray(getattr(par, f"{split}_tokens"))
    np.testing.assert_array_equal(a, b)
  # Every document is in exactly one split, each once, whatever the units.
  assert sorted(_docs_of(par, "train") + _docs_of(par, "validation")) == sorted(DOCS)
  # Rows over the shards equal plain slices of their concatenation, across shard boundaries.
  stream = par.train_tokens
  assert isinstance(stream, tokens.TokenStream)
  flat = np.asarray(stream)
  T = par.block_size
  rows = np.arange((len(flat) - 1) // T)
  got, valid = data.gather_rows(stream, rows, T)
  assert valid.all()
  np.testing.assert_array_equal(got, np.stack([flat[r * T:r * T + T + 1] for r in rows]))
  ends = stream.document_ends()
  np.testing.assert_array_equal(ends, np.flatnonzero(flat == tokenizer.EOS_ID) + 1)
  # Processes: each reads its P-th of every step's rows, disjoint, the union the step's rows.
  cfg = _cfg(tmp_path, dataset=f"text:{corpus_files}/a.jsonl", tokenize_workers=2,
             data_dir=str(tmp_path / "cache2"))
  parts = [data.build(cfg, None, p, 2) for p in (0, 1)]
  for step in (0, 5):
    rows = [set(p.train_rows(step).tolist()) for p in parts]
    assert not rows[0] & rows[1] and rows[0] | rows[1] == set(par.train_rows(step).tolist())
    joined = np.concatenate([p._batches()(step)["inputs"] for p in parts], 1)
    whole = par._batches()(step)["inputs"]
    assert sorted(map(tuple, joined[0])) == sorted(map(tuple, whole[0]))
  # The packed-row sampler over shards: the same rows, segments and resume as one stream.
  one = tokens.TokenStream([os.path.join(tmp_path, "flat.bin")], [len(flat)], flat.dtype)
  flat.tofile(one.paths[0])
  kw = dict(weights=[1.0], block_size=T, steps_per_epoch=par.steps_per_epoch, accum=1,
            per_proc=4, process_index=0, process_count=1, seed=0, pack_segments=True)
  a, b = data._TrainBatches([stream], **kw), data._TrainBatches([one], **kw)
  for step in (0, 3, par.steps_per_epoch + 1):
    x, y = a(step), b(step)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_interrupted_build_resumes_from_finished_units(corpus_files, tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "UNIT_BYTES", 3000)
  cfg = _cfg(tmp_path, dataset=f"text:{corpus_files}/a.jsonl", tokenize_workers=1)
  real, calls = tokens.run_job, []

  def dies_at_the_fourth(job, *a, **k):
    calls.append(job.index)
    if len(calls) == 4:
      raise KeyboardInterrupt  # as a signal would, mid-build
    return real(job, *a, **k)

  monkeypatch.setattr(tokens, "run_job", dies_at_the_fourth)
  with pytest.raises(KeyboardInterrupt):
    data.build(cfg, None, 0, 1)
  partial = [p for p in os.listdir(tmp_path / "cache" / "tokens") if p.endswith(".partial")]
  assert len(partial) == 1
  left = os.listdir(tmp_path / "cache" / "tokens" / partial[0])
  assert sorted(p for p in left if p.startswith("unit-")) == [
      f"unit-{i:05d}.json" for i in range(3)]
  assert not [p for p in left if p.startswith(".tmp-")]  # nothing half-written kept
  calls.clear()
  monkeypatch.setattr(tokens, "run_job", lambda job, *a, **k: (calls.append(job.index),
                                                                real(job, *a, **k))[1])
  resumed = data.build(cfg, None, 0, 1)
  assert calls and min(calls) == 3  # the finished units are not tokenized again
  whole = data.build(_cfg(tmp_path, dataset=f"text:{corpus_files}/a.jsonl",
                          data_dir=str(tmp_path / "fresh")), None, 0, 1)
  np.testing.assert_array_equal(np.asarray(resumed.train_tokens), np.asarray(whole.train_tokens))
  np.testing.assert_array_equal(np.asarray(resumed.validation_tokens),
                                np.asarray(whole.validation_tokens))


def test_mixture_draws_by_weight_from_the_step_alone(corpus_files, tmp_path):
  ds = f"mix:0.75*text:{corpus_files}/a.jsonl,0.25*text:{corpus_files}/txt"
  cfg = _cfg(tmp_path, dataset=ds, micro_batch_size=8)
  d = data.build(cfg, None, 0, 1)
  b = d._batches()
  counts = np.stack([b.counts(s) for s in range(400)])
  assert (counts.sum(1) == 8).all() and set(counts[:, 0]) <= {6}  # 0.75 * 8 = 6 exactly
  cfg3 = _cfg(tmp_path, dataset=f"mix:0.6*text:{corpus_files}/a.jsonl,"
              f"0.4*text:{corpus_files}/txt", micro_batch_size=8)
  d3 = data.build(cfg3, None, 0, 1)
  c3 = np.stack([d3._batches().counts(s) for s in range(2000)])
  assert set(c3[:, 0]) == {4, 5} and abs(c3[:, 0].mean() / 8 - 0.6) < 0.01
  assert d3.source_shares(7) == {n: k / 8 for n, k in zip(d3.source_names, c3[7])}
  # Deterministic from the step: a fresh iterator set to step s yields what step s yielded.
  it = d3.train_iter()
  first = [next(it) for _ in range(5)]
  it2 = d3.train_iter()
  it2.set_state(it.get_state())
  it3 = d3.train_iter()
  it3.set_state({"next_index": 3})
  np.testing.assert_array_equal(next(it3)["inputs"], first[3]["inputs"])
  np.testing.assert_array_equal(next(it2)["inputs"], next(it)["inputs"])
  # Two processes: disjoint shares whose union is the step's rows.
  p0, p1 = (data.build(cfg3, None, p, 2) for p in (0, 1))
  for step in (0, 9):
    whole = {tuple(r) for r in d3.train_rows(step)}
    parts = [{tuple(r) for r in p.train_rows(step)} for p in (p0, p1)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == whole and len(whole) == 8
  # Rows of source i come from source i's stream.
  src, rows = d3._batches().slots(5)
  batch = d3._batches()(5)
  for j, (s, r) in enumerate(zip(src, rows)):
    ref, _ = data.gather_rows(d3.train_streams[s], [r], d3.block_size)
    np.testing.assert_array_equal(batch["inputs"][0, j], ref[0, :-1])


def test_eval_reads_a_fixed_sample_of_a_large_split(corpus_files, tmp_path, capsys):
  cfg = _cfg(tmp_path, dataset=f"text:{corpus_files}/a.jsonl", validation_fraction=0.5,
             eval_tokens=64)
  d = data.build(cfg, None, 0, 1)
  assert "a fixed sample of 4 of the validation split's" in capsys.readouterr().out
  a, b = list(d.eval_batches()), list(d.eval_batches())
  assert d.num_eval_batches == 1 and len(a) == 1
  np.testing.assert_array_equal(a[0]["inputs"], b[0]["inputs"])
  n_rows = -(-(len(d.validation_tokens) - 1) // d.block_size)
  rows = d.eval_row_ids
  assert rows[0] == 0 and rows[-1] == n_rows - 1  # spread over the whole split
  whole = data.build(_cfg(tmp_path, dataset=f"text:{corpus_files}/a.jsonl",
                          validation_fraction=0.5, eval_tokens=0), None, 0, 1)
  assert whole.num_eval_batches == -(-n_rows // 4)


def _bad(tmp_path, name, content):
  d = tmp_path / "bad"
  d.mkdir(parents=True, exist_ok=True)
  (d / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:40]))
  p = d / name
  if callable(content):
    content(p)
  else:
    p.write_bytes(content)
  return d


def test_bad_inputs_name_the_file(corpus_files, tmp_path):
  def no_column(p):
    pq.write_table(pa.Table.from_pylist([{"body": "x", "id": 1}]), p)
  d = _bad(tmp_path, "b.parquet", no_column)
  with pytest.raises(data.DataError, match=r"b\.parquet: no column text_key='text' \(its "
                     r"columns: body, id\)"):
    data.build(_cfg(tmp_path, dataset=f"text:{d}/*"), None, 0, 1)
  gz = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in DOCS).encode())
  d = _bad(tmp_path / "t", "c.jsonl.gz", gz[:len(gz) // 2])
  with pytest.raises(data.DataError, match=r"c\.jsonl\.gz: the file is corrupt or truncated "
                     r"at byte [\d,]+ of [\d,]+"):
    data.build(_cfg(tmp_path / "t", dataset=f"text:{d}/*"), None, 0, 1)
  d = _bad(tmp_path / "e", "z.jsonl", b"")
  with pytest.raises(data.DataError, match=r"z\.jsonl is empty"):
    data.build(_cfg(tmp_path / "e", dataset=f"mix:0.5*text:{corpus_files}/a.jsonl,"
                    f"0.5*text:{d}/z.jsonl"), None, 0, 1)


def test_changed_mixture_weights_resume_where_other_data_changes_restart():
  from llm_jax import resume  # pylint: disable=g-import-not-at-top
  same = resume._only_weights_changed  # pylint: disable=protected-access
  assert same("mix:0.7*text:/a/*.parquet,0.3*shakespeare", "mix:1*text:/a/*.parquet,3*shakespeare")
  assert not same("mix:0.7*text:/a/*.parquet,0.3*shakespeare", "mix:0.7*text:/b,0.3*shakespeare")
  assert not same("text:/a", "text:/b")
  with pytest.raises(sources.DataError, match="sum to 0"):
    sources.parse_mixture("mix:0*shakespeare,0*text:/a")
  assert sources.parse_mixture("mix:3*text:/a/{x,y}/*.txt,1*shakespeare") == [
      (0.75, "text:/a/{x,y}/*.txt"), (0.25, "shakespeare")]  # a comma inside a glob stays


def test_unreadable_file_in_a_glob_and_a_cache_of_another_tokenizer(corpus_files, tmp_path,
                                                                    monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  d = _bad(tmp_path, "locked.jsonl", b'{"text": "x"}\n')
  real_open = builtins.open

  def denied(path, *a, **k):  # root reads any file: a permission error as the OS would give it
    if str(path).endswith("locked.jsonl"):
      raise PermissionError(13, "Permission denied", str(path))
    return real_open(path, *a, **k)

  monkeypatch.setattr(builtins, "open", denied)
  with pytest.raises(data.DataError, match=r"locked\.jsonl: cannot be read \(Permission denied\)"):
    data.build(_cfg(tmp_path, dataset=f"text:{d}/*.jsonl"), None, 0, 1)
  monkeypatch.setattr(builtins, "open", real_open)
  # A cache whose shards another tokenizer made (copied in by hand) is refused, naming it.
  cfg = _cfg(tmp_path, dataset=f"text:{corpus_files}/a.jsonl")
  built = data.build(cfg, None, 0, 1)
  meta_path = os.path.join(built.meta["cache_dir"], "meta.json")
  meta = json.load(open(meta_path, encoding="utf-8"))
  meta["tokenizer"] = "0" * 16
  with open(meta_path, "w", encoding="utf-8") as f:
    json.dump(meta, f)
  with pytest.raises(data.DataError, match="tokenized with another tokenizer"):
    data.build(cfg, None, 0, 1)
