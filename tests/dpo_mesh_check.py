"""DPO train steps under a mesh and with gradient accumulation, on 8 CPU devices; run by
test_dpo.py as a subprocess.

From the same params and pairs, one optimizer step of: LoRA DPO (reference: the base with the
adapters off) on meshes (1, 1, 1) and (2, 2, 2); full-fine-tuning DPO (reference log-probs in the
batch) on mesh (1, 1, 1) with one micro-batch of 8 pairs, on (2, 2, 2) with 2 scanned
micro-batches of 4, and with optax.MultiSteps over the same 2. Prints one JSON object: each
step's loss, reward accuracy and the max |difference| of its updated params from its group's first.

    python tests/dpo_mesh_check.py   # prints the JSON
"""

import json
import os
import sys
import types

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

from llm_jax import config  # noqa: E402
from llm_jax import sharding  # noqa: E402
from llm_jax import train  # noqa: E402

TINY = dict(vocab_size=200, vocab_multiple=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2,
            max_seq_len=16, warmup_steps=0, lr_decay="constant", learning_rate=0.1,
            optimizer="sgd", momentum=0.0, weight_decay=0.0,  # the update is the gradient's
            init_from="unused", objective="dpo", dpo_beta=0.5, activation="swiglu",
            use_rms_norm=True, use_bias=False, tie_embeddings=False)
RUNS = {  # name: (group, mesh, micro_batch_size, accumulation, grad_accum, lora_r)
    "lora_1x1x1": ("lora", (1, 1, 1), 8, 1, "scan", 4),
    "lora_2x2x2": ("lora", (2, 2, 2), 8, 1, "scan", 4),
    "full_1x1x1": ("full", (1, 1, 1), 8, 1, "scan", 0),
    "full_2x2x2_scan2": ("full", (2, 2, 2), 4, 2, "scan", 0),
    "full_2x2x2_multisteps2": ("full", (2, 2, 2), 4, 2, "multisteps", 0),
}


def pairs_batch(accum, micro):
  """8 pairs [8, 2, T]: random prompts of 3-6 tokens, completions of 2-8, padded; and their
  reference log-probs."""
  rng = np.random.default_rng(0)
  T = 16
  tokens = np.zeros((8, 2, T + 1), np.int32)
  weights = np.zeros((8, 2, T), np.float32)
  for n in range(8):
    p = rng.integers(3, 7)
    for k in range(2):
      c = rng.integers(2, 9)
      tokens[n, k, :p + c] = rng.integers(4, 200, p + c)
      tokens[n, k, :p] = tokens[n, 0, :p]  # the same prompt on both sides
      weights[n, k, p - 1:p + c - 1] = 1
  ref = -rng.uniform(5, 30, (8, 2)).astype(np.float32)
  batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "weights": weights,
           "ref_logps": ref}
  return {k: v.reshape((accum, micro) + v.shape[1:]) for k, v in batch.items()}


def main():
  out = {"devices": jax.device_count(), "steps": {}}
  first = {}
  for name, (group, shape, micro, accum, how, lora_r) in RUNS.items():
    cfg = config.load(os.path.join(ROOT, "configs", "base.py"), **TINY, mesh_shape=shape,
                      micro_batch_size=micro, gradient_accumulation_steps=accum, grad_accum=how,
                      lora_r=lora_r, lora_targets="all", lora_dropout=0.0)
    mesh = sharding.make_mesh(cfg, jax.devices()[:int(np.prod(shape))])
    probe = train.Trainer(cfg, 10, mesh=mesh)  # the whole model's shapes and shardings
    if lora_r:
      shapes, shardings = probe.abstract_base, jax.tree.map(lambda x: x.sharding,
                                                            probe.abstract_base)
    else:
      shapes, shardings = probe.abstract_params, probe.param_shardings
    params = jax.device_put(helpers.random_params(shapes, std=0.05), shardings)
    trainer = train.Trainer(cfg, 10, mesh=mesh, base=types.SimpleNamespace(params=params))
    state = trainer.init_state(0)
    before = jax.device_get(state.params)
    batch = pairs_batch(accum, micro)
    if lora_r:
      del batch["ref_logps"]  # the step computes the reference from the base
    state, step_out = trainer.train_step(state, batch)
    got = jax.device_get(state.params)
    first.setdefault(group, got)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got),
                                                          jax.tree.leaves(first[group])))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got),
                                                           jax.tree.leaves(before)))
    out["steps"][name] = {"loss": float(step_out["loss"]), "param_diff": diff, "moved": moved,
                          "accuracy": float(step_out["rewards/accuracies"])}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
