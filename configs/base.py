"""Every knob of llm_jax, its default and a one-line meaning.

Other configs start from this one and change a few fields. Field names follow the two reference
sheets (`P` = the parameter reference, `C` = the experimentation cheat sheet, `+` = our addition).
Fields left as None are derived in `llm_jax/config.py` after command-line overrides, so
`--config.d_model=1024` also moves d_k, d_v and d_ff unless you set those explicitly.

    python main.py --config=configs/base.py --workdir=runs/base --mode=estimate
"""

import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


def get_config():
  c = ml_collections.ConfigDict()

  # --- Model dimensions (P: Core Dimensions, C: Core Transformer Parameters) ---
  c.vocab_size = 2048  # P/C: tokenizer vocabulary; the embedding is padded to a multiple of vocab_multiple
  c.vocab_multiple = 128  # +: pad the embedding rows to this multiple for speed (padded ids never reachable)
  c.d_model = 256  # P/C: hidden size
  c.n_heads = 8  # P/C: query heads
  c.n_kv_heads = placeholder(int)  # +: key/value heads for grouped-query attention (None = n_heads)
  c.n_layers = 4  # P/C: transformer blocks
  c.d_ff = placeholder(int)  # P/C: feed-forward width (None = 4 * d_model)
  c.d_k = placeholder(int)  # P: query/key head dim (None = d_model / n_heads)
  c.d_v = placeholder(int)  # P: value head dim (None = d_k)
  c.max_seq_len = 256  # P (C: MAX_LEN): longest context the model supports
  c.block_size = placeholder(int)  # P: training sequence length (None = max_seq_len)
  c.max_position_embeddings = placeholder(int)  # P: learned position table size (None = max_seq_len)
  c.position_embedding = "rope"  # +: rope | sinusoidal | learned
  c.rope_theta = 10000.0  # P: RoPE base frequency
  c.activation = "gelu"  # +: FFN activation: relu (C's formula) | gelu | swiglu | relu2 (squared ReLU)
  c.use_rms_norm = False  # P: RMSNorm instead of LayerNorm
  c.layer_norm_eps = 1e-5  # P: norm epsilon
  c.use_bias = True  # +: biases in dense layers and LayerNorm
  c.tie_embeddings = True  # +: output head shares the token embedding matrix
  c.qk_norm = False  # +: RMSNorm on each head's queries and keys (before RoPE), a learned scale per head dim

  # --- Regularization (P: Regularization Parameters) ---
  c.dropout = 0.0  # P: on the embeddings and on the attention block's output
  c.attention_dropout = 0.0  # P: on the attention probabilities
  c.hidden_dropout = 0.0  # P: on the FFN output

  # --- Precision and memory (P: Memory & Efficiency) ---
  c.dtype = "float32"  # P (torch_dtype): compute dtype: float32 | float16 | bfloat16
  c.param_dtype = "float32"  # +: dtype parameters and optimizer state are stored in
  c.use_flash_attention = False  # P: fused attention: cuDNN on GPU (bf16/fp16), Pallas on TPU; else XLA
  c.remat_policy = "none"  # +: gradient checkpointing per block: none | full | dots (save matmul outputs)
  c.scan_layers = False  # +: nn.scan over blocks (faster compile, ~30% slower step on GPU)
  c.load_in_8bit = False  # P: int8 weight quantization (not available yet: set False)
  c.load_in_4bit = False  # P: int4 weight quantization (not available yet: set False)

  # --- Optimizer and schedule (P: Training Parameters, C: LR) ---
  c.optimizer = "adamw"  # +: adamw | lion | adafactor | sgd | muon | schedule_free_adamw (README: Optimizers)
  c.learning_rate = 3e-4  # P/C: peak learning rate (muon: of its AdamW part)
  c.min_learning_rate = placeholder(float)  # +: floor the decay ends at (None = learning_rate / 10)
  c.warmup_steps = 100  # P: linear warmup in optimizer steps: step s gets learning_rate * s / warmup_steps
  c.lr_decay = "cosine"  # P: cosine | linear | exponential | constant | wsd (warmup-stable-decay), after warmup
  c.decay_fraction = 0.2  # +: wsd: share of all steps, at the end, that decays linearly to min_learning_rate
  c.beta1 = 0.9  # P: Adam first-moment decay (lion: b1; schedule_free_adamw: its interpolation b1)
  c.beta2 = 0.999  # P: Adam second-moment decay (lion: b2, 0.99 usual)
  c.epsilon = 1e-8  # P: Adam epsilon
  c.weight_decay = 0.1  # P: decoupled weight decay, times the learning rate, of every optimizer
  c.momentum = 0.9  # +: sgd: momentum (0 = plain SGD)
  c.nesterov = True  # +: sgd, muon: Nesterov momentum
  c.muon_learning_rate = 0.02  # +: muon: peak learning rate of the projection matrices (same schedule)
  c.muon_momentum = 0.95  # +: muon: momentum of the orthogonalised updates (optax's beta)
  c.muon_ns_steps = 5  # +: muon: Newton-Schulz iterations
  c.muon_consistent_rms = placeholder(float)  # +: muon: updates scaled to this RMS (0.2 = AdamW's size; None = width scaling)
  c.adafactor_decay_rate = 0.8  # +: adafactor: second-moment decay exponent
  c.adafactor_clipping_threshold = 1.0  # +: adafactor: clip each update's RMS to this (0 = off)
  c.adafactor_multiply_by_parameter_scale = True  # +: adafactor: learning rate relative to each parameter's RMS
  c.adafactor_momentum = placeholder(float)  # +: adafactor: first-moment decay (None = no momentum, the memory saving)
  c.adafactor_factored = True  # +: adafactor: factored second moments (row and column statistics)
  c.adafactor_min_dim_size_to_factor = 128  # +: adafactor: factor only when two axes are at least this long
  c.weight_lr_power = 2.0  # +: schedule_free_adamw: averaging weight is learning_rate ** weight_lr_power
  c.decay_embeddings = False  # +: also decay embeddings (biases and norm scales never are)
  c.max_grad_norm = 1.0  # P: global-norm clipping threshold (0 = off)
  c.z_loss = 0.0  # +: weight of the log(Z)^2 auxiliary loss (PaLM uses 1e-4)

  # --- Batches (P: Batch Processing, C: BATCH_SIZE) ---
  c.batch_size = placeholder(int)  # P/C: sequences per optimizer step (None = micro * accumulation)
  c.micro_batch_size = 32  # P: sequences per forward/backward pass, summed over data-parallel devices
  c.gradient_accumulation_steps = 1  # P: micro-batches per optimizer step
  c.grad_accum = "scan"  # +: scan (micro-batches inside one jitted step) | multisteps (optax.MultiSteps)

  # --- Training control (P: Training Control, C: NUM_EPOCHS / SAVE_INTERVAL) ---
  c.num_train_steps = placeholder(int)  # +: optimizer steps; when None, num_train_epochs decides
  c.num_train_epochs = 1.0  # P/C: passes over the training split (used when num_train_steps is None)
  c.eval_steps = 200  # P: evaluate every this many optimizer steps (0 = only at the end)
  c.eval_batches = placeholder(int)  # +: cap on validation batches per periodic evaluation (None = whole split; the final one is always whole)
  c.save_steps = 1000  # P: checkpoint every this many optimizer steps (0 = only at the end)
  c.save_every_epochs = 0  # C (SAVE_INTERVAL): also checkpoint every this many epochs (0 = off)
  c.max_to_keep = 3  # +: most recent checkpoints kept (the best by eval loss is kept as well)
  c.checkpoint_step = placeholder(int)  # +: step to load for eval/sample (None = latest)
  c.log_every = 20  # +: optimizer steps between metric lines
  c.sample_every_eval = True  # +: print a few sampled lines at each evaluation
  c.seed = 0  # +: one seed for init, dropout, data order and sampling
  c.loss_explosion_factor = 10.0  # +: stop when loss exceeds this times its running minimum (0 = off)

  # --- Data (+) ---
  c.dataset = "shakespeare"  # +: shakespeare | text:<dir or glob> | tfds:<name>[/<config>]
  c.validation = ""  # +: text: a glob of validation files; tfds: a split name ("" = validation, test, or validation_fraction)
  c.validation_fraction = 0.05  # +: share of documents held out when no validation glob is given
  c.text_key = "text"  # +: text field of .jsonl files and tfds datasets
  c.text_split = "file"  # +: a document in text: datasets: file | paragraph (blank-line separated) | line
  c.tfds_data_dir = placeholder(str)  # +: where tfds: datasets are prepared (None = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data_dir = placeholder(str)  # +: dataset/tokenized cache (None = $LLM_JAX_CACHE or ~/.cache/llm_jax)
  c.tokenizer_path = placeholder(str)  # +: sentencepiece model (None = <workdir>/tokenizer.model)
  c.tokenizer_type = "unigram"  # +: unigram | bpe
  c.byte_fallback = True  # +: unknown characters become bytes, so decode(encode(x)) == x
  c.pack_segments = False  # +: segment ids so attention never crosses document boundaries
  c.data_workers = 0  # +: grain worker processes (0 = in the main process)
  c.prefetch = 2  # +: batches prepared ahead of the train step

  # --- Decoding (P: Inference Parameters, C: Sampling Strategies) ---
  c.do_sample = True  # P: sample (True) or greedy / beam search (False)
  c.temperature = 0.8  # P/C: divide logits by this (lower = more deterministic)
  c.top_k = 0  # P/C: keep the k most likely tokens (0 = off)
  c.top_p = 1.0  # P/C: keep the smallest set with this much probability (1.0 = off)
  c.repetition_penalty = 1.0  # P: >1 discourages tokens already present (1.0 = off)
  c.num_beams = 1  # P: beam search width (1 = no beam search)
  c.length_penalty = 1.0  # P: beam score = log p / length ** length_penalty
  c.max_new_tokens = 200  # P: tokens generated after the prompt
  c.min_length = 0  # P: new tokens before EOS may be produced
  c.use_cache = True  # P: KV cache during generation (False recomputes everything, for checking)
  c.stop_token = placeholder(str)  # +: extra piece that ends a row, besides EOS

  # --- Fine-tuning (P: LoRA) ---
  c.lora_r = 0  # P: LoRA rank (0 = off; not available yet)
  c.lora_alpha = placeholder(float)  # P: LoRA scale numerator (None = 2 * lora_r)
  c.lora_dropout = 0.05  # P: dropout on the LoRA branch

  # --- Parallelism (+) ---
  c.mesh_shape = (-1, 1, 1)  # +: devices along (data, fsdp, tensor); -1 = the rest
  c.dcn_mesh_shape = (1, 1, 1)  # +: hosts/slices along (data, fsdp, tensor)
  c.logical_axis_rules = ""  # +: overrides of sharding.RULES, e.g. "vocab:none,embed:fsdp+tensor" ('+' joins axes, none = replicated)
  return c
