"""Small, 125M parameters: the parameter reference's "Small Model" (GPT-2 small's shape).

    python main.py --config=configs/small.py --mode=estimate
    python main.py --config=configs/small.py --workdir=runs/small \
        --config.dataset='text:/path/to/corpus/*.txt'

Expect 124.5M parameters (the sheet says 125M; the vocab is padded to 50304). A 50257-token
vocabulary needs a corpus of tens of MB: bring your own (`text:` or `tfds:`); the embedded Shakespeare
is too small for it. Learned positions, LayerNorm and GELU as in GPT-2; bf16 compute with cuDNN
attention on a GPU (elsewhere XLA attention, with a warning).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.d_model = 768
  c.n_heads = 12
  c.n_layers = 12
  c.d_ff = 3072
  c.vocab_size = 50257
  c.max_seq_len = 1024
  c.position_embedding = "learned"
  c.dtype = "bfloat16"
  c.use_flash_attention = True
  c.micro_batch_size = 12
  c.gradient_accumulation_steps = 40
  c.learning_rate = 6e-4
  c.min_learning_rate = 6e-5
  c.beta2 = 0.95
  c.warmup_steps = 2000
  c.num_train_steps = 600000
  c.eval_steps = 2000
  c.save_steps = 2000
  c.log_every = 10
  return c
