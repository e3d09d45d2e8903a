"""Default: a small model that trains on 2 CPU cores in about 5 minutes on the embedded Shakespeare.

    python main.py --config=configs/default.py --workdir=runs/default
    python main.py --config=configs/default.py --workdir=runs/default --mode=sample --prompt="ROMEO:"

Expect the validation loss to fall from 8.3 nats (uniform over 4096 tokens) to about 4.07, about
2.04 bits per character on the two held-out plays (2.20 at the first evaluation, step 300), in
5 to 6 minutes on 2 cores, dataset and tokenizer build included (0.41 s per step). Chosen by
measurement (bench/RESULTS.md): at this compute a narrow model taking many small steps beats a
wider one taking fewer large ones; Muon (orthogonalised updates for the projection matrices,
AdamW for the rest) beats AdamW by 0.1 bits per character in the same time, 3 Newton-Schulz
iterations instead of 5 buying the steps that pay for it; 4096 sentencepiece pieces put more
text in each token than 2048, and a 3x FFN buys back the larger output layer's time (0.02 more).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.vocab_size = 4096  # 2.89 characters per token (2048: 2.64, and 0.03 bits/char worse)
  c.d_model = 128
  c.n_heads = 4
  c.n_layers = 4
  c.d_ff = 384  # 3 x d_model: the steps it saves beat the width (4x at fewer steps: worse)
  c.max_seq_len = 128
  c.micro_batch_size = 16
  c.optimizer = "muon"
  c.muon_learning_rate = 0.04  # the projection matrices (0.02 and 0.06: worse)
  c.muon_ns_steps = 3
  c.learning_rate = 3e-3  # AdamW's part: embeddings, norms, biases
  c.min_learning_rate = 3e-4
  c.beta2 = 0.95
  c.warmup_steps = 30
  c.num_train_steps = 760
  c.eval_steps = 300
  c.eval_batches = 8
  c.save_steps = 300
  c.log_every = 10
  c.max_new_tokens = 120  # prompt + new tokens stay within the trained context of 128
  return c
