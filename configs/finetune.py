"""Fine-tune: LoRA adapters (r=8 on every projection) on a trained model, for your own text.

    python main.py --config=configs/finetune.py --workdir=runs/ft \
        --config.init_from=runs/default --config.dataset='text:/data/mine/*.txt'
    python main.py --config=configs/finetune.py --workdir=runs/ft --mode=sample --prompt="def "
    python main.py --config=configs/finetune.py --workdir=runs/ft --mode=export \
        --config.export_dir=runs/merged

The model's fields (sizes, positions, norms, the tokenizer) come from init_from, so this file sets
none. Expect, from runs/default (`make train`) on text of another kind (Python's reference
documentation: the 79 topics of the standard library's pydoc_data as .txt files, 4 held out;
README, "Fine-tuning"): the eval loss falls from 7.32 (the Shakespeare model, 5.24 bits/char) to
4.18 (2.99 bits/char) after 300 steps, training 66k adapter parameters beside the frozen 1.2M, in
about 4 minutes on 2 cores (each step costs about what a step of the default's training does).
Full fine-tuning: --config.lora_r=0 --config.learning_rate=3e-4. QLoRA (an nf4 base):
--config.load_in_4bit=True.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.lora_r = 8
  c.lora_targets = "all"
  c.lora_dropout = 0.05
  c.learning_rate = 2e-3  # LoRA's adapters start at zero and take a larger step than full weights
  c.min_learning_rate = 2e-4
  c.warmup_steps = 20
  c.weight_decay = 0.0
  c.micro_batch_size = 16
  c.num_train_steps = 300
  c.eval_steps = 50
  c.eval_batches = 16
  c.save_steps = 100
  c.log_every = 10
  c.max_new_tokens = 120
  return c
