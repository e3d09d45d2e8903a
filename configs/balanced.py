"""Medium (Balanced): the cheat sheet's second "Example LLM Experiment Configuration".

VOCAB_SIZE 50K, D_MODEL 1024, N_LAYERS 12, N_HEADS 16, MAX_LEN 256, BATCH_SIZE 64.

    python main.py --config=configs/balanced.py --mode=estimate
    python main.py --config=configs/balanced.py --workdir=runs/balanced \
        --config.dataset='text:/path/to/corpus/*.txt'

Expect 202.4M parameters. Meant for one GPU (bf16, cuDNN attention).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.vocab_size = 50000
  c.d_model = 1024
  c.n_layers = 12
  c.n_heads = 16
  c.max_seq_len = 256
  c.batch_size = 64
  c.micro_batch_size = None
  c.learning_rate = 3e-4
  c.dtype = "bfloat16"
  c.use_flash_attention = True
  c.num_train_epochs = 10.0
  c.save_every_epochs = 5
  return c
