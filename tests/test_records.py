"""records.py: every format read back as written by the tools users write them with (json,
gzip, zstandard, pyarrow, datasets' to_json / to_parquet / save_to_disk), and each kind of damage
reported with the file and the place."""

import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llm_jax import records

ROWS = [{"text": f"document {i} " + "é" * i, "label": i % 3} for i in range(2500)]


def _jsonl(rows):
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("records")
  out = {}
  out["jsonl"] = d / "a.jsonl"
  out["jsonl"].write_bytes(_jsonl(ROWS[:3]) + b"\n" + _jsonl(ROWS[3:]))  # a blank line inside
  out["gz"] = d / "a.jsonl.gz"
  out["gz"].write_bytes(gzip.compress(_jsonl(ROWS)))
  out["zst"] = d / "a.jsonl.zst"
  out["zst"].write_bytes(zstandard.ZstdCompressor().compress(_jsonl(ROWS)))
  out["array"] = d / "array.json"
  out["array"].write_text(json.dumps(ROWS, indent=2))
  out["object"] = d / "object.json"
  out["object"].write_text(json.dumps({"version": 1, "data": ROWS}, indent=1))
  out["parquet"] = d / "a.parquet"
  pq.write_table(pa.Table.from_pylist(ROWS), out["parquet"], row_group_size=700)
  ds = datasets.Dataset.from_list(ROWS)
  out["to_json"] = d / "to_json.json"
  ds.to_json(str(out["to_json"]))  # JSON lines under a .json name
  out["to_parquet"] = d / "to_parquet.parquet"
  ds.to_parquet(str(out["to_parquet"]))
  out["disk"] = d / "disk"
  ds.save_to_disk(str(out["disk"]), max_shard_size="20KB")  # several data-*.arrow files
  out["dict"] = d / "dict"
  datasets.DatasetDict({"train": ds, "validation": ds.select(range(10))}).save_to_disk(
      str(out["dict"]))
  return out


@pytest.mark.parametrize("name", ["jsonl", "gz", "zst", "array", "object", "parquet", "to_json",
                                  "to_parquet", "disk"])
def test_every_format_reads_back_what_was_written(files, name):
  got = [r for _, r in records.iter_records(str(files[name]))]
  assert got == ROWS
  texts = [t for batch in records.iter_texts(str(files[name]), "text") for t in batch]
  assert texts == [r["text"] for r in ROWS]


def test_save_to_disk_is_split_over_several_arrow_files_and_read_in_order(files):
  assert len(records._arrow_files(str(files["disk"]), None)) > 1


def test_places_name_the_line_or_row(files):
  where = [w for w, _ in records.iter_records(str(files["jsonl"]))]
  assert where[2].endswith("a.jsonl:3") and where[3].endswith("a.jsonl:5")  # blank line 4
  where = [w for w, _ in records.iter_records(str(files["parquet"]))]
  assert where[1000].endswith("a.parquet:row 1000")


def test_dataset_dict_needs_a_split_and_reads_the_one_named(files):
  with pytest.raises(records.RecordsError, match="splits train, validation"):
    list(records.iter_records(str(files["dict"])))
  got = records.read_records(str(files["dict"]), split="validation")
  assert [r for _, r in got] == ROWS[:10]


def test_columns_are_checked_and_listed(files):
  for name in ("parquet", "disk"):
    with pytest.raises(records.RecordsError, match=r"no column 'body' \(its columns: text, label"):
      list(records.iter_texts(str(files[name]), "body"))
  with pytest.raises(records.RecordsError, match=r"a.jsonl:1: no field 'body' \(has: 'text', "):
    list(records.iter_texts(str(files["jsonl"]), "body"))
  with pytest.raises(records.RecordsError, match="holds int64, not strings"):
    list(records.iter_texts(str(files["parquet"]), "label"))


@pytest.mark.parametrize("name", ["gz", "zst"])
def test_a_truncated_compressed_file_names_the_byte_offset(files, tmp_path, name):
  data = files[name].read_bytes()
  cut = tmp_path / files[name].name
  cut.write_bytes(data[:len(data) // 2])
  it = records.iter_records(str(cut))
  with pytest.raises(records.RecordsError, match=r"corrupt or truncated at byte [\d,]+ of"):
    list(it)


def test_a_corrupt_parquet_file_is_named(tmp_path, files):
  bad = tmp_path / "bad.parquet"
  bad.write_bytes(files["parquet"].read_bytes()[:300])
  with pytest.raises(records.RecordsError, match="bad.parquet: not a readable Parquet file"):
    list(records.iter_records(str(bad)))


def test_bad_json_lines(tmp_path):
  p = tmp_path / "x.jsonl"
  p.write_text('{"a": 1}\n[1, 2]\n')
  with pytest.raises(records.RecordsError, match=r"x.jsonl:2: a JSON list, not an object"):
    list(records.iter_records(str(p)))
  p.write_text('{"a": 1}\n{"a": \n')
  with pytest.raises(records.RecordsError, match=r"x.jsonl:2: not valid JSON"):
    list(records.iter_records(str(p)))
  p.write_bytes(b'{"a": "\xff\xfe"}\n')
  with pytest.raises(records.RecordsError, match="not UTF-8"):
    list(records.iter_records(str(p)))


def test_kinds():
  assert records.kind("a/b.JSONL.zst") == "jsonl" and records.kind("x.json.gz") == "json"
  assert records.kind("x.txt") is None and records.kind("x.parquet") == "parquet"
  with pytest.raises(records.RecordsError, match="not a records file"):
    list(records.iter_records("x.txt"))


def test_field_names_what_the_record_has():
  assert records.field({"a": "x"}, "a", "f:1", str) == "x"
  with pytest.raises(records.RecordsError, match=r"f:1: field 'a' is a int, not a str; fix it"):
    records.field({"a": 1}, "a", "f:1", str, "fix it")
