"""Default: a small model that trains on 2 CPU cores in about 5 minutes on the embedded Shakespeare.

    python main.py --config=configs/default.py --workdir=runs/default
    python main.py --config=configs/default.py --workdir=runs/default --mode=sample --prompt="ROMEO:"

Expect the validation loss to fall from ~7.6 (uniform over 2048 tokens) to about 2.2 bits per
character on the held-out plays.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.vocab_size = 2048
  c.d_model = 256
  c.n_heads = 8
  c.n_layers = 4
  c.max_seq_len = 128
  c.micro_batch_size = 32
  c.learning_rate = 1e-3
  c.min_learning_rate = 1e-4
  c.beta2 = 0.95
  c.warmup_steps = 50
  c.num_train_steps = 500
  c.eval_steps = 100
  c.eval_batches = 20
  c.save_steps = 250
  c.log_every = 10
  c.max_new_tokens = 120  # prompt + new tokens stay within the trained context of 128
  return c
