"""Medium, 350M parameters: the parameter reference's "Medium Model" (GPT-2 medium's shape, T 2048).

    python main.py --config=configs/medium.py --mode=estimate
    python main.py --config=configs/medium.py --workdir=runs/medium --config.learning_rate=3e-4 \
        --config.dataset='text:/path/to/corpus/*.txt'

Expect 356M parameters (the sheet says 350M). Bring a corpus large enough for a 50257-token
vocabulary. bf16 compute with cuDNN attention on a GPU.
"""

from configs import small


def get_config():
  c = small.get_config()
  c.d_model = 1024
  c.n_heads = 16
  c.n_layers = 24
  c.d_ff = 4096
  c.max_seq_len = 2048
  c.micro_batch_size = 8
  c.gradient_accumulation_steps = 32
  c.learning_rate = 3e-4
  c.min_learning_rate = 3e-5
  return c
