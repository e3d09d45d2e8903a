"""Large (Powerful): the cheat sheet's third "Example LLM Experiment Configuration".

VOCAB_SIZE 100K, D_MODEL 2048, N_LAYERS 24, N_HEADS 32, MAX_LEN 512, BATCH_SIZE 128.

    python main.py --config=configs/powerful.py --mode=estimate
    python main.py --config=configs/powerful.py --workdir=runs/powerful --config.mesh_shape='(1,-1,1)' \
        --config.dataset='text:/path/to/corpus/*.txt'

Expect 1.41B parameters. Needs an 80 GB GPU or several devices (fsdp); 128 sequences per step are
reached with 4 accumulation steps of 32.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.vocab_size = 100000
  c.d_model = 2048
  c.n_layers = 24
  c.n_heads = 32
  c.max_seq_len = 512
  c.batch_size = 128
  c.micro_batch_size = 32
  c.gradient_accumulation_steps = 4
  c.learning_rate = 2e-4
  c.dtype = "bfloat16"
  c.use_flash_attention = True
  c.num_train_epochs = 10.0
  c.save_every_epochs = 5
  return c
