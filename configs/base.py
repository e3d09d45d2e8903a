"""Every knob of llm_jax, its default and a one-line meaning.

Other configs start from this one and change a few fields. Field names follow the two reference
sheets (`P` = the parameter reference, `C` = the experimentation cheat sheet, `+` = our addition).
Fields left as None are derived in `llm_jax/config.py` after command-line overrides, so
`--config.d_model=1024` also moves d_k, d_v and d_ff unless you set those explicitly.

    python main.py --config=configs/base.py --mode=estimate
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
  c.rope_scaling = "none"  # +: RoPE scaling for longer contexts, as Hugging Face's rope_type: none | linear | dynamic (NTK) | yarn | llama3 (README: Long context)
  c.rope_scaling_factor = placeholder(float)  # +: every rope_scaling (HF factor): the context gained, e.g. 4 for 128 -> 512
  c.rope_original_max_len = placeholder(int)  # +: dynamic / yarn / llama3 (HF original_max_position_embeddings): the context the model was trained at
  c.rope_low_freq_factor = placeholder(float)  # +: llama3: wavelengths above rope_original_max_len / this are divided by the factor (Llama 3.1: 1)
  c.rope_high_freq_factor = placeholder(float)  # +: llama3: wavelengths below rope_original_max_len / this are kept (Llama 3.1: 4)
  c.rope_beta_fast = placeholder(float)  # +: yarn: dims turning more often than this in the trained context keep their frequency (None = 32)
  c.rope_beta_slow = placeholder(float)  # +: yarn: dims turning less often than this are interpolated (None = 1)
  c.rope_attention_factor = placeholder(float)  # +: yarn: cos/sin scale (None = 0.1 ln(factor) + 1, or from the mscales)
  c.rope_mscale = placeholder(float)  # +: yarn: DeepSeek's mscale (with rope_mscale_all_dim sets the attention factor)
  c.rope_mscale_all_dim = placeholder(float)  # +: yarn: DeepSeek's mscale_all_dim
  c.rope_truncate = placeholder(bool)  # +: yarn: round the ramp's ends to whole dims (None = True; gpt-oss: False)
  c.sliding_window = placeholder(int)  # +: attend to the last this-many tokens only (Mistral, Gemma); None = full causal; decoding keeps a ring-buffer cache of this size
  c.activation = "gelu"  # +: FFN activation: relu (C's formula) | gelu (tanh approx., GPT-2) | gelu_exact (erf) | swiglu | relu2 (squared ReLU)
  c.use_rms_norm = False  # P: RMSNorm instead of LayerNorm
  c.layer_norm_eps = 1e-5  # P: norm epsilon
  c.use_bias = True  # +: biases in dense layers and LayerNorm
  c.qkv_bias = placeholder(bool)  # +: biases on the query/key/value projections (None = use_bias; Qwen2: True with use_bias False)
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
  c.load_in_8bit = False  # P: int8 weights, one scale per output channel (eval, sample, LoRA base)
  c.load_in_4bit = False  # P: 4-bit weights in groups of quant_group_size (eval, sample, QLoRA base)
  c.quant_type = "nf4"  # +: load_in_4bit's format: nf4 (QLoRA's normal-float levels) | int4
  c.quant_group_size = 64  # +: load_in_4bit: weights per scale along the contracted axis (must divide it)
  c.quantize_embeddings = False  # +: also quantize an untied output head (else embeddings and head stay in the compute dtype)

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
  c.eval_batches = placeholder(int)  # +: cap on validation batches per periodic evaluation (None = every evaluation row; the final one reads them all: the whole split, or its eval_tokens sample)
  c.eval_tokens = 2_097_152  # +: a validation split larger than this is evaluated on a fixed evenly spaced sample of about this many tokens, the same rows every time (0 = whole split)
  c.save_steps = 1000  # P: checkpoint every this many optimizer steps (0 = only at the end)
  c.save_every_epochs = 0  # C (SAVE_INTERVAL): also checkpoint every this many epochs (0 = off)
  c.max_to_keep = 3  # +: most recent checkpoints kept (the best by eval loss is kept as well)
  c.checkpoint_step = placeholder(int)  # +: step to load for eval/sample (None = latest)
  c.log_every = 20  # +: optimizer steps between metric lines
  c.sample_every_eval = True  # +: print a few sampled lines at each evaluation
  c.seed = 0  # +: one seed for init, dropout, data order and sampling
  c.loss_explosion_factor = 10.0  # +: stop when loss exceeds this times its running minimum (0 = off)

  # --- Data (+) ---
  c.dataset = "shakespeare"  # +: shakespeare | text:<dir, file or glob> (.txt .jsonl[.gz|.zst] .parquet .arrow, save_to_disk dirs) | tfds:<name>[/<config>] | mix:<w>*<dataset>,<w>*<dataset>,...; objective=sft: conversation files (a file, directory or glob of .jsonl/.json/.parquet/.arrow, or a save_to_disk folder)
  c.validation = ""  # +: text: a glob of validation files; tfds: a split name ("" = validation, test, or validation_fraction)
  c.validation_fraction = 0.05  # +: share of documents held out when no validation glob is given
  c.text_key = "text"  # +: text field of .jsonl records, column of Parquet/Arrow files, feature of tfds datasets
  c.text_split = "file"  # +: a document in text: datasets: file | paragraph (blank-line separated) | line
  c.tfds_data_dir = placeholder(str)  # +: where tfds: datasets are prepared (None = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data_dir = placeholder(str)  # +: dataset/tokenized cache (None = $LLM_JAX_CACHE or ~/.cache/llm_jax)
  c.tokenizer_path = placeholder(str)  # +: sentencepiece model (None = <workdir>/tokenizer.model)
  c.tokenizer_type = "unigram"  # +: unigram | bpe
  c.byte_fallback = True  # +: unknown characters become bytes, so decode(encode(x)) == x
  c.pack_segments = False  # +: segment ids so attention never crosses document boundaries
  c.data_workers = 0  # +: grain worker processes (0 = in the main process)
  c.tokenize_workers = placeholder(int)  # +: processes tokenizing a text: corpus once into the cache (None = the host's cores)
  c.prefetch = 2  # +: batches prepared ahead of the train step

  # --- Chat (+): conversations, the chat template, --mode=chat (README "Chat tuning") ---
  c.objective = "lm"  # +: what training minimises: lm (next token of text) | sft (assistant turns of conversations: dataset = conversation files)
  c.chat_template = ""  # +: "" = the model's own (an import's tokenizer_config.json; ChatML for models trained here) | chatml | a .jinja file | a tokenizer_config.json | the template text
  c.train_on_prompt = False  # +: sft: also train on system and user tokens (no prompt mask)

  # --- Decoding (P: Inference Parameters, C: Sampling Strategies) ---
  c.do_sample = True  # P: sample (True) or greedy / beam search (False)
  c.temperature = 0.8  # P/C: divide logits by this (lower = more deterministic)
  c.top_k = 0  # P/C: keep the k most likely tokens (0 = off)
  c.top_p = 1.0  # P/C: keep the smallest set with this much probability (1.0 = off)
  c.repetition_penalty = 1.0  # P: >1 discourages tokens already present (1.0 = off)
  c.num_beams = 1  # P: beam search width (1 = no beam search)
  c.num_return_sequences = 1  # +: rows per prompt: samples from distinct random streams, or the best beams
  c.length_penalty = 1.0  # P: beam score = log p / length ** length_penalty
  c.max_new_tokens = 200  # P: tokens generated after the prompt
  c.min_length = 0  # P: new tokens before EOS may be produced
  c.use_cache = True  # P: KV cache during generation (False recomputes everything, for checking)
  c.stop_token = placeholder(str)  # +: extra piece that ends a row, besides EOS

  # --- Serving (+): --mode=serve, the OpenAI-compatible server ---
  c.serve_host = "127.0.0.1"  # +: address to bind (0.0.0.0 = every interface: set serve_api_key)
  c.serve_port = 8000  # +: TCP port
  c.serve_slots = 8  # +: decode slots: requests decoded together, each with its own KV-cache rows
  c.serve_max_queue = 64  # +: sequences waiting for a slot before new requests get 429
  c.serve_max_tokens = placeholder(int)  # +: most max_tokens a request may ask for (None = the context)
  c.serve_max_n = 8  # +: most choices (n) per request
  c.serve_max_body_bytes = 1000000  # +: request bodies over this get 413
  c.serve_api_key = placeholder(str)  # +: require Authorization: Bearer <key> on /v1 (None = $LLM_JAX_SERVE_API_KEY, unset = open)
  c.serve_model_name = placeholder(str)  # +: the model id clients name (None = the workdir's name)

  # --- Fine-tuning (P: LoRA) ---
  c.init_from = placeholder(str)  # +: start from this trained workdir (its latest checkpoint) or checkpoint directory; only its params are taken
  c.lora_r = 0  # P: LoRA rank (0 = off: with init_from, full fine-tuning)
  c.lora_alpha = placeholder(float)  # P: LoRA scale numerator: updates are scaled by lora_alpha / lora_r (None = 2 * lora_r)
  c.lora_dropout = 0.05  # P: dropout on the LoRA branch's input, in training only
  c.lora_targets = "q,v"  # +: projections given adapters: any of q,k,v,o,wi,wo,gate,up, or all
  c.lora_train_embeddings = False  # +: with LoRA, also train the whole embedding table (and an untied head) beside the adapters (PEFT's modules_to_save)
  c.lora_trainable_tokens = ""  # +: with LoRA, train only these tokens' embedding (and untied head) rows: ids or token strings, comma-separated (PEFT's trainable_token_indices)
  c.export_dir = placeholder(str)  # +: --mode=export: where to write the merged checkpoint (a workdir)

  # --- Objective (+): what training minimises (README "Preference tuning (DPO)") ---
  c.objective = "lm"  # +: lm (next-token cross-entropy) | dpo (preference pairs prompt/chosen/rejected from dataset=text:<file>; needs init_from)
  c.dpo_beta = 0.1  # +: dpo: strength of the pull toward the reference (TRL's beta; IPO's tau)
  c.dpo_label_smoothing = 0.0  # +: dpo sigmoid: assumed probability a preference label is flipped (conservative DPO; 0 = plain DPO)
  c.dpo_loss_type = "sigmoid"  # +: dpo: sigmoid (DPO, Rafailov et al. 2023) | ipo (Azar et al. 2023, log-probs averaged per token)

  # --- Hugging Face import / export (+) ---
  c.hf_path = placeholder(str)  # +: --mode=import: a local Hugging Face model directory (config.json, *.safetensors, tokenizer)
  c.hf_export_dir = placeholder(str)  # +: --mode=export: write the model here in Hugging Face format (config, safetensors, tokenizer)

  # --- Parallelism (+) ---
  c.mesh_shape = (-1, 1, 1, 1)  # +: devices along (data, fsdp, tensor, context); -1 = the rest (3 entries: context 1)
  c.dcn_mesh_shape = (1, 1, 1, 1)  # +: hosts/slices along (data, fsdp, tensor, context)
  c.context_parallel_impl = "all_gather"  # +: attention over a sequence sharded on the context axis: all_gather (K/V gathered, O(S) memory per device) | ring (K/V blocks passed round, O(S / context))
  c.context_load_balance = True  # +: with context > 1, each device holds a front and a back chunk of the sequence, so causal attention's work is even
  c.logical_axis_rules = ""  # +: overrides of sharding.RULES, e.g. "vocab:none,embed:fsdp+tensor" ('+' joins axes, none = replicated)

  # --- Ahead-of-time compile (+): --mode=compile, "will it fit" before paying for the slice ---
  c.compile_topology = ""  # +: TPU slice or NVIDIA GPU target to compile for: Cloud name (v5p-128, v6e-256, v5litepod-16), topology (v5p:4x4x4), or GPUs (h100, h200, a100-80gb, 8xh100, 2x8xh100: needs .[cuda]); "" = the devices present
  c.compile_save = ""  # +: also write the compiled train step to this file, to load on the slice (same jax/libtpu)
  c.compile_what = "train"  # +: --mode=compile compiles the train step (train) or the sampler's prefill + decode loop (decode: micro_batch_size prompts of block_size - max_new_tokens tokens)

  # --- Downstream tasks (+): --mode=tasks, lm-eval's scoring (README "Downstream tasks") ---
  c.tasks = ""  # +: comma-separated task names, each optionally name=/path/to/file ("" = the built-in play tasks)
  c.tasks_dir = placeholder(str)  # +: folder of task files found by name (hellaswag.jsonl, .json, .parquet, or a save_to_disk folder)
  c.num_fewshot = 0  # +: solved examples before each item, drawn with lm-eval's fixed seed
  c.tasks_limit = 0  # +: at most this many items per task (0 = all)
  c.tasks_batch_size = 32  # +: rows per scoring batch (one compile per length bucket)
  c.tasks_every = 0  # +: during training, score the tasks every this many steps (and at the end) into metrics.jsonl / TensorBoard (0 = off)
  return c
