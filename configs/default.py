"""Default: a small model that trains on 2 CPU cores in about 5 minutes on the embedded Shakespeare.

    python main.py --config=configs/default.py --workdir=runs/default
    python main.py --config=configs/default.py --workdir=runs/default --mode=sample --prompt="ROMEO:"

Expect the validation loss to fall from 7.6 nats (uniform over 2048 tokens) to about 3.96, about
2.16 bits per character on the two held-out plays (about 2.4 at the first evaluation, step 300),
in about 5 minutes on 2 AVX2 cores, dataset and tokenizer build included (0.3 s per step).
Chosen by measurement (bench/RESULTS.md): at this compute a narrow model taking many small steps
beats a wider one taking fewer large ones.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.vocab_size = 2048
  c.d_model = 128
  c.n_heads = 4
  c.n_layers = 4
  c.max_seq_len = 128
  c.micro_batch_size = 16
  c.learning_rate = 3e-3
  c.min_learning_rate = 3e-4
  c.beta2 = 0.95
  c.warmup_steps = 30
  c.num_train_steps = 850
  c.eval_steps = 300
  c.eval_batches = 8
  c.save_steps = 300
  c.log_every = 10
  c.max_new_tokens = 120  # prompt + new tokens stay within the trained context of 128
  return c
