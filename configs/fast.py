"""Small (Fast): the cheat sheet's first "Example LLM Experiment Configuration".

VOCAB_SIZE 20K, D_MODEL 512, N_LAYERS 6, N_HEADS 8, MAX_LEN 128, BATCH_SIZE 32.

    python main.py --config=configs/fast.py --mode=estimate
    python main.py --config=configs/fast.py --workdir=runs/fast \
        --config.dataset='text:/path/to/corpus/*.txt'

Expect 29.2M parameters. A 20K vocabulary wants a few tens of MB of text; on the embedded
Shakespeare lower it: --config.vocab_size=4096.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.vocab_size = 20000
  c.d_model = 512
  c.n_layers = 6
  c.n_heads = 8
  c.max_seq_len = 128
  c.batch_size = 32
  c.micro_batch_size = None
  c.learning_rate = 1e-3
  c.num_train_epochs = 10.0
  c.save_every_epochs = 5
  return c
