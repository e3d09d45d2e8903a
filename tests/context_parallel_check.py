"""Context parallel == unsharded, on 8 CPU devices; run by test_context_parallel.py as a subprocess.

Prints one JSON object:

- "grads": per case (implementation, mesh (data, fsdp, tensor, context), packing, load
  balancing), the loss of one micro-batch and the max |difference| of every gradient leaf from
  the (1, 1, 1, 1) run's on the same batch (and that run's largest gradient, for scale), and
  whether the compiled step holds the collectives its implementation should (collective-permute
  for the ring, all-gather for all_gather);
- "resume": a run on context 4 saved at step 2 and resumed on context 2 (other data/fsdp axes):
  the losses of steps 3 and 4 and the final params' difference from the uninterrupted run's;
- "memory": per implementation and context degree, XLA's temp (activation) bytes per device of
  one train step of a model whose activations dominate.

    python tests/context_parallel_check.py   # prints the JSON
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import helpers  # noqa: E402

helpers.use_fast_compile()

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from llm_jax import checkpoint  # noqa: E402
from llm_jax import config  # noqa: E402
from llm_jax import data as data_lib  # noqa: E402
from llm_jax import sharding  # noqa: E402
from llm_jax import train  # noqa: E402

BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
# 4 query heads over 2 kv heads (grouped); T = 32 splits into 2 x 8 chunks of 2 tokens.
# The layers scanned: one body to compile per case (and the path configs/large.py takes).
TINY = dict(vocab_size=200, vocab_multiple=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
            max_seq_len=32, micro_batch_size=4, z_loss=1e-3, warmup_steps=0,
            lr_decay="constant", sample_every_eval=False, scan_layers=True)
EOS = 7
# (impl, mesh, packed, load_balance): 2, 4 and 8 ways for each implementation with and without
# packing, and beside fsdp, tensor (2 kv heads over tensor 4: not divisible) and data.
CASES = [(impl, (1, 1, 1, c), packed, True) for impl in ("all_gather", "ring") for c in (2, 4, 8)
         for packed in (False, True)] + [
             ("all_gather", (1, 2, 2, 2), True, True), ("ring", (1, 2, 2, 2), True, True),
             ("all_gather", (2, 2, 1, 2), False, True), ("ring", (1, 1, 4, 2), True, True),
             # contiguous shards (no load balancing)
             ("ring", (2, 1, 1, 4), True, False), ("all_gather", (1, 2, 1, 4), True, False)]


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _batch(packed):
  rng = np.random.default_rng(0)
  tokens = rng.integers(8, TINY["vocab_size"], size=(TINY["micro_batch_size"], 33))
  tokens[:, rng.integers(1, 32, size=6)] = EOS  # several documents per row
  batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
  if packed:
    batch["segment_ids"], batch["positions"] = data_lib.segments(batch["inputs"], EOS)
  return batch


def _grads(cfg, mesh_shape, batch, params=None):
  cfg = config.load(BASE_CONFIG, **{**TINY, **cfg}, mesh_shape=mesh_shape)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  trainer = train.Trainer(cfg, total_steps=10, mesh=sharding.make_mesh(cfg, devices))
  if params is None:
    params = trainer.init_state(0).params
  else:
    params = jax.device_put(params, trainer.param_shardings)
  fn = jax.jit(lambda p, b, t=trainer: jax.value_and_grad(train.loss_fn, has_aux=True)(
      p, t.model, b, None, t.cfg.z_loss, True))
  grad_fn = trainer._in_context(fn, base=False)  # pylint: disable=protected-access
  micro = sharding.global_batch(batch, trainer.mesh)
  (loss, _), grads = grad_fn(params, micro)
  hlo = grad_fn.lower(params, micro).compile().as_text()
  return float(loss), jax.device_get(grads), jax.device_get(params), hlo


def check_grads():
  out, refs = {}, {}
  for packed in (False, True):
    loss, grads, params, _ = _grads({}, (1, 1, 1, 1), _batch(packed))
    refs[packed] = (loss, grads, params)
  for impl, mesh, packed, lb in CASES:
    ref_loss, ref_grads, params = refs[packed]
    loss, grads, _, hlo = _grads(dict(context_parallel_impl=impl, context_load_balance=lb,
                                      pack_segments=packed), mesh, _batch(packed), params)
    key = f"{impl} {'x'.join(map(str, mesh))} packed={packed} balanced={lb}"
    out[key] = {"loss": loss, "ref_loss": ref_loss, "grad_diff": _max_diff(grads, ref_grads),
                "grad_scale": max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads)),
                "n_leaves": len(jax.tree.leaves(grads)),
                "collective_permute": "collective-permute" in hlo,
                "all_gather": "all-gather" in hlo}
  # A sliding window on the context-parallel paths equals the unsharded windowed run.
  for impl, mesh, packed in (("ring", (1, 1, 1, 4), True), ("all_gather", (1, 2, 1, 2), False)):
    window = dict(sliding_window=5, pack_segments=packed)
    ref_loss, ref_grads, params, _ = _grads(window, (1, 1, 1, 1), _batch(packed))
    loss, grads, _, hlo = _grads(dict(window, context_parallel_impl=impl), mesh, _batch(packed),
                                 params)
    out[f"{impl} {'x'.join(map(str, mesh))} packed={packed} balanced=True window=5"] = {
        "loss": loss, "ref_loss": ref_loss, "grad_diff": _max_diff(grads, ref_grads),
        "grad_scale": max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads)),
        "n_leaves": len(jax.tree.leaves(grads)),
        "collective_permute": "collective-permute" in hlo, "all_gather": "all-gather" in hlo}
  return out


def check_resume():
  """Context 4 (fsdp 2) for 2 steps, saved; resumed on context 2 (data 2, fsdp 2) for steps 3
  and 4; against the same 4 steps uninterrupted on context 4."""
  root = tempfile.mkdtemp()
  helpers.write_corpus(os.path.join(root, "text"))
  fields = dict(TINY, vocab_size=128, byte_fallback=False, max_seq_len=16, micro_batch_size=4,
                dataset=f"text:{root}/text/train", validation=f"{root}/text/val/*.txt",
                data_dir=os.path.join(root, "data"), pack_segments=True, num_train_steps=4,
                context_parallel_impl="ring")

  def setup(workdir, mesh_shape):
    cfg = config.load(BASE_CONFIG, **fields, mesh_shape=mesh_shape)
    data = data_lib.build(cfg, workdir, 0, 1)
    trainer = train.Trainer(cfg, cfg.num_train_steps, mesh=sharding.make_mesh(
        cfg, jax.devices()[:int(np.prod(mesh_shape))]))
    ckpt = checkpoint.Checkpointer(workdir, cfg, data.steps_per_epoch,
                                   os.path.join(workdir, "tokenizer.model"))
    it = data.train_iter()
    return trainer, ckpt, it, ckpt.restore_or_init(trainer, it)

  def steps(trainer, state, it, n):
    losses = []
    for _ in range(n):
      state, o = trainer.train_step(state, next(it))
      losses.append(float(o["loss"]))
    return state, losses

  straight = os.path.join(root, "straight")
  trainer, ckpt, it, state = setup(straight, (1, 2, 1, 4))
  state, want = steps(trainer, state, it, 4)
  want_params = jax.device_get(state.params)
  ckpt.close()

  resumed = os.path.join(root, "resumed")
  trainer, ckpt, it, state = setup(resumed, (1, 2, 1, 4))
  state, first = steps(trainer, state, it, 2)
  ckpt.save(2, state, it, force=True)
  ckpt.wait()
  ckpt.close()
  trainer, ckpt, it, state = setup(resumed, (2, 2, 1, 2))
  step = int(state.step)
  specs = {str(s.sharding.spec) for s in jax.tree.leaves(state.params)}
  state, then = steps(trainer, state, it, 2)
  ckpt.close()
  return {"want": want, "got": first + then, "resumed_at": step,
          "mesh": dict(trainer.mesh.shape), "param_specs": sorted(specs),
          "param_diff": _max_diff(jax.device_get(state.params), want_params)}


def check_memory():
  """Per implementation and context degree 1, 2, 4, 8 (each device: T / C tokens of every row),
  XLA's temp (activation) and argument bytes per device of one train step of a model whose
  activations dwarf its weights (d_model 64, T 1024). Context 1 is plain attention for both."""
  out = {}
  for impl in ("all_gather", "ring"):
    for c in (1, 2, 4, 8):
      if c == 1 and impl == "ring":
        out[f"{impl} 1"] = out["all_gather 1"]
        continue
      cfg = config.load(BASE_CONFIG, **{**TINY, "d_model": 64, "n_heads": 4, "n_kv_heads": 4,
                                        "max_seq_len": 1024, "micro_batch_size": 1},
                        mesh_shape=(1, 1, 1, c), context_parallel_impl=impl)
      trainer = train.Trainer(cfg, 10, mesh=sharding.make_mesh(cfg, jax.devices()[:c]))
      mem = trainer.lower_train_step().compile().memory_analysis()
      out[f"{impl} {c}"] = {"temp": int(mem.temp_size_in_bytes),
                            "args": int(mem.argument_size_in_bytes)}
  return out


if __name__ == "__main__":
  print(json.dumps({"devices": jax.device_count(), "grads": check_grads(),
                    "resume": check_resume(), "memory": check_memory()}))
