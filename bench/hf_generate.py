"""Hugging Face `generate` against our decode on the same weights, as a table and JSON.

    python bench/hf_generate.py                       # configs/small.py (GPT-2 124M), batch 1 and 32
    python bench/hf_generate.py --tiny                # CPU smoke run, tiny shapes

Random weights (init), exported through llm_jax's own Hugging Face export (hf.export, GPT-2
family) with the test fixture's GPT-2 tokenizer files, loaded by transformers'
AutoModelForCausalLM in the config's dtype. Both decode greedily from the same random prompts,
exactly --new_tokens tokens per row (min_new_tokens / min_length keep EOS away), timed after a
warm-up call; new tokens/s = batch * new_tokens / seconds, the prefill included. Row 0's tokens
are compared: greedy decoding of the same weights agrees until the two numerics first pick a
different argmax (bf16 ties), so the agreeing prefix length is reported, not asserted. Needs
torch and transformers (absent: says so and exits 0).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm_jax import config as config_lib  # noqa: E402
from llm_jax import hf  # noqa: E402
from llm_jax import hf_tokenizer  # noqa: E402
from llm_jax import model as model_lib  # noqa: E402
from llm_jax import sampling  # noqa: E402
from llm_jax import topology  # noqa: E402

TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=512, max_seq_len=64,
            dtype="float32", use_flash_attention=False)
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "hf", "gpt2")


def _time(fn, repeats):
  fn()  # warm-up: compiles (ours) / builds kernels (torch)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "small.py"))
  p.add_argument("--batch_sizes", default="1,32")
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "hf_generate.json"))
  args = p.parse_args()
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"hf_generate: skipped, {e.name} is not installed (pip install -e '.[hf]')")
    return 0
  if args.tiny:
    args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats = "1,4", 8, 16, 1
  cfg = config_lib.load(args.config, **(TINY if args.tiny else {}))
  model_cfg = model_lib.ModelConfig.from_config(cfg)
  params = model_lib.init_params(model_cfg, jax.random.key(0))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  rows = []
  with tempfile.TemporaryDirectory() as out_dir:
    hf.export(model_cfg, params, hf_tokenizer.from_hf_dir(TOKENIZER), out_dir)
    dtype = getattr(torch, cfg.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).to(device)
    model.eval()
    for batch in (int(b) for b in args.batch_sizes.split(",")):
      prompt = np.random.default_rng(batch).integers(0, cfg.vocab_size,
                                                     size=(batch, args.prompt_len))
      ids = torch.tensor(prompt, device=device)
      scfg = sampling.SamplingConfig.from_config(
          cfg, max_new_tokens=args.new_tokens, min_length=args.new_tokens, do_sample=False,
          num_beams=1, use_cache=True)
      prompt_j, valid_j = jax.device_put((prompt.astype(np.int32), np.ones(prompt.shape, bool)))
      result = {}

      def ours():
        result["ours"] = np.asarray(sampling.decode(
            params, prompt_j, valid_j, jax.random.key(0), model_cfg=model_cfg, scfg=scfg,
            eos_id=0)[0])

      def theirs():
        with torch.no_grad():
          out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               pad_token_id=0)
        if device == "cuda":
          torch.cuda.synchronize()
        result["hf"] = out[:, args.prompt_len:].cpu().numpy()

      t_ours, t_hf = _time(ours, args.repeats), _time(theirs, args.repeats)
      same = result["ours"][0] == result["hf"][0]
      agree = int(np.argmin(same)) if not same.all() else len(same)
      row = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
             "ours_new_tokens_per_s": batch * args.new_tokens / t_ours,
             "hf_new_tokens_per_s": batch * args.new_tokens / t_hf,
             "row0_greedy_tokens_agreeing": agree, "dtype": cfg.dtype,
             "attention": model_cfg.attention_impl, "jax_device": jax.devices()[0].device_kind,
             "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
             "torch": torch.__version__, "transformers": transformers.__version__}
      rows.append(row)
      print(f"batch {batch:>4}: ours {row['ours_new_tokens_per_s']:>10,.0f} new tok/s, HF "
            f"generate {row['hf_new_tokens_per_s']:>10,.0f}; row 0 agrees for {agree} of "
            f"{args.new_tokens} greedy tokens", flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"jax": jax.__version__, "config": args.config, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  topology.choose_platform()  # before any jax backend starts
  sys.exit(main())
