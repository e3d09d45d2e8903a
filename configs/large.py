"""Large, 1.3B parameters: the parameter reference's "Large Model" (GPT-3 XL's shape).

    python main.py --config=configs/large.py --mode=estimate
    python main.py --config=configs/large.py --workdir=runs/large --config.mesh_shape='(1,-1,1)' \
        --config.dataset='text:/path/to/corpus/*.txt'

Expect 1.32B parameters (the sheet says 1.3B). On one 80 GB GPU it fits with bf16 compute; over
several devices shard parameters and optimizer state with fsdp (mesh_shape (1, -1, 1)).
"""

from configs import small


def get_config():
  c = small.get_config()
  c.d_model = 2048
  c.n_heads = 32
  c.n_layers = 24
  c.d_ff = 8192
  c.max_seq_len = 2048
  c.micro_batch_size = 8
  c.gradient_accumulation_steps = 64
  c.learning_rate = 2e-4
  c.min_learning_rate = 2e-5
  return c
