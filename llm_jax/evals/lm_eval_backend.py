"""An lm-evaluation-harness model over an llm_jax workdir: lm-eval's hundreds of tasks on our models.

    import lm_eval
    from llm_jax.evals.lm_eval_backend import LlmJaxLM
    lm = LlmJaxLM("runs/default")                      # any workdir --mode=tasks reads
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], num_fewshot=0)

Needs the [eval] extra (`pip install -e ".[eval]"`: lm-eval). The class is lm-eval's `TemplateLM`,
so lm-eval itself tokenizes each (context, continuation) pair (`_encode_pair`, the empty-context
prefix) and builds the rolling windows (`utils.get_rolling_token_windows`); the token rows are
scored by engine.Scorer, the batched forward pass --mode=tasks uses, and generation runs through
the sampler. Registered as lm-eval model "llm_jax" (`--model llm_jax --model_args
workdir=runs/default` where lm-eval's CLI can import this module first).
"""

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llm_jax import sampling
from llm_jax.evals import engine

MAX_GEN_TOKS = 256  # lm-eval's HFLM default max_gen_toks


@register_model("llm_jax")
class LlmJaxLM(TemplateLM):
  """lm-eval's model API over a loaded llm_jax model (see the module docstring).

  workdir: a workdir or checkpoint directory (loader.load); step: its checkpoint (None =
  latest); config: the ml_collections config to load with (default: configs/base.py), e.g. one
  with load_in_4bit; batch_size: rows per scoring batch; loaded: an already loaded model instead
  of a workdir.
  """

  def __init__(self, workdir: str | None = None, step: int | None = None, config=None,
               batch_size: int = 32, loaded=None, progress: bool = False, seed: int = 0):
    super().__init__()
    if loaded is None:
      from llm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
      from llm_jax import loader  # pylint: disable=import-outside-toplevel
      import os  # pylint: disable=import-outside-toplevel
      if config is None:
        base = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), "configs", "base.py")
        config = config_lib.load(base)
      loaded = loader.load(workdir, config, step=None if step is None else int(step))
    self.scorer = engine.Scorer(loaded, batch_size=int(batch_size), progress=progress)
    self.tok = loaded.tokenizer
    self._cfg = loaded.cfg
    self._seed = int(seed)

  # -- what TemplateLM asks ---------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.scorer.prefix_id

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del kwargs
    add = self.tok.add_bos if add_special_tokens is None else add_special_tokens
    return self.tok.encode(string, add_bos=bool(add and self.tok.bos_id is not None))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    del disable_tqdm, kwargs
    return self.scorer.score_tokens([(ctx, cont) for _, ctx, cont in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """HFLM's rolling definition: lm-eval's windows (context_len 1), each scored, summed."""
    del disable_tqdm
    windows, owner = [], []
    for k, (text,) in enumerate(r.args for r in requests):
      for w in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1):
        windows.append(lm_utils.make_disjoint_window(w))
        owner.append(k)
    lls = [0.0] * len(requests)
    for k, (ll, _) in zip(owner, self.scorer.score_tokens(windows)):
      lls[k] += ll
    return lls

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy unless the request's gen_kwargs sample; cut at `until` (and EOS's text)."""
    del disable_tqdm
    import jax  # pylint: disable=import-outside-toplevel
    out = [None] * len(requests)
    groups = {}
    for i, r in enumerate(requests):
      context, kwargs = r.args
      groups.setdefault(repr(sorted(kwargs.items())), (kwargs, []))[1].append((i, context))
    for kwargs, members in groups.values():
      kwargs = dict(kwargs)
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      over = {"max_new_tokens": int(kwargs.pop("max_gen_toks", MAX_GEN_TOKS)),
              "do_sample": bool(kwargs.pop("do_sample", False))}
      if "temperature" in kwargs:
        t = float(kwargs.pop("temperature"))
        over["temperature"] = t if t > 0 else 1.0
        over["do_sample"] = over["do_sample"] and t > 0
      for name in ("top_k", "top_p"):
        if name in kwargs:
          over[name] = kwargs.pop(name)
      scfg = sampling.SamplingConfig.from_config(self._cfg, **over)
      self.scorer.check_generation(until, scfg.max_new_tokens, "generate_until")
      texts = self.scorer.generate_until([c for _, c in members], until, scfg,
                                         jax.random.key(self._seed))
      for (i, _), text in zip(members, texts):
        out[i] = text
    return out
