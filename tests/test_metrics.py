"""Tests for llm_jax.metrics: FLOP/MFU accounting, device peaks, writers, plots."""

import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from llm_jax import config
from llm_jax import metrics


def _gpt2_124m_n_params(d=768, n_layers=12, vocab=50304):
  """GPT-2 small without position embeddings, tied head, biases and LayerNorms, by hand."""
  embedding = vocab * d
  attention = (d * 3 * d + 3 * d) + (d * d + d)  # qkv and output projections with biases
  mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
  norms = 2 * 2 * d  # two LayerNorms per block, scale and bias each
  return embedding + n_layers * (attention + mlp + norms) + 2 * d  # + final LayerNorm


def test_flops_per_token_and_mfu_gpt2_small():
  cfg = config.load("configs/base.py", d_model=768, n_layers=12, n_heads=12, vocab_size=50304,
                    max_seq_len=1024)
  n = _gpt2_124m_n_params()
  assert n == 123_689_472  # the familiar "124M" minus the 786,432 learned position entries
  per_token = metrics.flops_per_token(cfg, n)
  assert per_token == 6 * n + 12 * 12 * 12 * 64 * 1024
  np.testing.assert_allclose(per_token, 855.38e6, rtol=1e-4)
  peak = metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3")
  # DESIGN.md's table: plain Flax, batch 12, 441k tokens/s on one H100 -> 38% MFU.
  util = metrics.mfu(441e3, per_token, peak)
  assert round(util * 100) == 38
  np.testing.assert_allclose(util, 441e3 * 855.383040e6 / 989e12, rtol=1e-6)
  assert metrics.mfu(441e3, per_token, None) is None
  # Shorter context: only the attention term moves.
  assert metrics.flops_per_token(cfg, n, seq_len=512) == 6 * n + 12 * 12 * 12 * 64 * 512


def test_count_params_excludes_positions_and_counts_tied_embedding_once():
  params = {"embed": {"embedding": jnp.zeros((100, 8))},
            "pos_embed": {"embedding": jnp.zeros((16, 8))},
            "block": {"kernel": jnp.zeros((8, 24)), "bias": jnp.zeros((24,))},
            "ln_f": {"scale": jnp.zeros((8,))}}
  assert metrics.count_params(params) == 800 + 192 + 24 + 8
  assert metrics.count_params(params, exclude_position_embeddings=False) == 800 + 128 + 192 + 24 + 8


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("tpu V6E", 918e12),
    ("cpu", None),
    ("NVIDIA GeForce RTX 3090", None),
])
def test_device_peak_lookup(kind, peak):
  assert metrics.peak_flops_per_device(kind) == peak


def test_bits_per_char_and_perplexity():
  # 4 characters per token at loss ln(2) * 8 nats: 8 bits per token, 2 bits per character.
  assert metrics.bits_per_char(8 * math.log(2), 4.0) == pytest.approx(2.0)
  assert metrics.perplexity(math.log(50.0)) == pytest.approx(50.0)
  assert metrics.perplexity(1e6) == math.inf


def _read_tfrecords(path):
  """Records of a TFRecord file, checking the masked CRC32C of each length and payload."""
  with open(path, "rb") as f:
    data = f.read()
  records, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert length_crc == masked_crc32c(header)
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert payload_crc == masked_crc32c(payload)
    records.append(payload)
    pos += 16 + length
  return records


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
  with metrics.MetricWriter(workdir) as w:
    w.write(10, {"train/loss": jnp.float32(2.5), "train/lr": np.float64(1e-3),
                 "train/tokens": np.int64(4096)})
    w.write(20, {"eval/loss": 2.25, "eval/bits_per_char": 1.75})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert lines == [{"step": 10, "train/loss": 2.5, "train/lr": 1e-3, "train/tokens": 4096},
                   {"step": 20, "eval/loss": 2.25, "eval/bits_per_char": 1.75}]

  (event_file,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  scalars = {}
  for record in _read_tfrecords(event_file):
    event = event_pb2.Event.FromString(record)
    for value in event.summary.value:
      scalars[(event.step, value.tag)] = value.simple_value
  assert scalars == pytest.approx({(10, "train/loss"): 2.5, (10, "train/lr"): 1e-3,
                                   (10, "train/tokens"): 4096.0, (20, "eval/loss"): 2.25,
                                   (20, "eval/bits_per_char"): 1.75})

  # A disabled writer (processes other than 0) creates nothing.
  quiet = str(tmp_path / "quiet")
  w = metrics.MetricWriter(quiet, enabled=False)
  w.write(1, {"train/loss": 1.0})
  w.close()
  assert not os.path.exists(quiet)


def test_plot_losses_writes_png(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "train/loss": 5.0 / (1 + s)} for s in range(0, 100, 10)]
  rows += [{"step": s, "eval/loss": 4.0 / (1 + s), "eval/bits_per_char": 3.0 / (1 + s)}
           for s in (50, 99)]
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 1')  # cut-off line
  png = tmp_path / "plots" / "loss.png"
  assert metrics.plot_losses(str(jsonl), str(png)) == str(png)
  data = png.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  width, height = struct.unpack(">II", data[16:24])  # IHDR
  assert (width, height) == (800, 500)
