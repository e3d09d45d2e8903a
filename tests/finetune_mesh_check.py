"""QLoRA under a mesh, on 8 CPU devices; run by test_finetune.py as a subprocess.

For each mesh: the nf4 base (scanned layers, untied head) is quantized where its params live, and
one LoRA train step is taken from the same adapters and batch, with three tokens' embedding and
head rows training beside the adapters (lora_trainable_tokens). Prints one JSON object: per mesh, the
step's loss and the max |difference| of the updated adapters from the (1, 1, 1) mesh's, and
whether every quantized kernel's codes are sharded as its full-precision kernel is.

    python tests/finetune_mesh_check.py   # prints the JSON
"""

import dataclasses
import json
import os
import sys
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import helpers  # noqa: E402

helpers.use_fast_compile()  # compile time dominates on CPU: see sharding_check.py

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from llm_jax import config  # noqa: E402
from llm_jax import loader  # noqa: E402
from llm_jax import lora  # noqa: E402
from llm_jax import model as model_lib  # noqa: E402
from llm_jax import quantize  # noqa: E402
from llm_jax import sharding  # noqa: E402
from llm_jax import train  # noqa: E402

TINY = dict(vocab_size=200, vocab_multiple=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2,
            max_seq_len=16, micro_batch_size=8, warmup_steps=0, lr_decay="constant",
            learning_rate=1e-2, init_from="unused", lora_r=4, lora_targets="all",
            lora_dropout=0.0, load_in_4bit=True, quant_group_size=32, scan_layers=True,
            activation="swiglu", use_rms_norm=True, use_bias=False, tie_embeddings=False,
            lora_trainable_tokens="5,17,150")
MESHES = [(1, 1, 1), (2, 2, 2)]


def main():
  out = {"devices": jax.device_count(), "steps": {}}
  seq = np.random.default_rng(0).integers(4, 200, size=(1, 8, 17)).astype(np.int32)
  batch = {"inputs": seq[..., :-1], "targets": seq[..., 1:]}
  ref = None
  for shape in MESHES:
    cfg = config.load(os.path.join(ROOT, "configs", "base.py"), **TINY, mesh_shape=shape)
    mesh = sharding.make_mesh(cfg, jax.devices()[:int(np.prod(shape))])
    mc = model_lib.ModelConfig.from_config(cfg)
    target, shardings = loader.abstract(
        dataclasses.replace(mc, lora_r=0, quant=""), mesh, sharding.logical_rules(cfg))
    plain = jax.device_put(helpers.random_params(target, std=0.05), shardings)
    base = loader.quantized(plain, mc, mesh, sharding.logical_rules(cfg))
    same_layout = []
    for name, leaf in traverse_util.flatten_dict(
        base, is_leaf=lambda _, v: quantize.is_quantized(v)).items():
      if quantize.is_quantized(leaf):
        kernel = traverse_util.flatten_dict(plain)[name]
        same_layout.append(leaf.array.qvalue.sharding.spec == kernel.sharding.spec)
    trainer = train.Trainer(cfg, 10, mesh=mesh, base=types.SimpleNamespace(params=base))
    state = trainer.init_state(0)
    state, step_out = trainer.train_step(state, batch)
    adapters = jax.device_get(state.params)
    if ref is None:
      ref = adapters
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(adapters),
                                                          jax.tree.leaves(ref)))
    flat, flat_plain = traverse_util.flatten_dict(state.params), traverse_util.flatten_dict(plain)
    out["steps"]["x".join(map(str, shape))] = {
        # the rows keep the table's sharding of its embed axis (the vocab axis is the ids')
        "rows_sharded_as_tables": [
            flat[("embed", "lora", "delta")].sharding.spec[1:] ==
            flat_plain[("embed", "embedding")].sharding.spec[1:],
            flat[("lm_head", "lora", "delta")].sharding.spec[:1] ==
            flat_plain[("lm_head", "kernel")].sharding.spec[:1]],
        "rows_moved": float(np.abs(np.asarray(flat[("embed", "lora", "delta")])).max()),
        "loss": float(step_out["loss"]), "adapter_diff": diff,
        "n_quantized": len(same_layout), "codes_sharded_as_kernels": all(same_layout),
        "adapter_leaves": len(jax.tree.leaves(adapters)),
        "all_adapters": all(lora.is_adapter(p) for p, _ in
                            jax.tree_util.tree_flatten_with_path(adapters)[0])}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
