"""Scoring exactly as lm-evaluation-harness 0.4.x defines it: pure functions, no model, no jax.

Each function names the lm-eval code it mirrors (lm_eval/api/model.py `TemplateLM`,
lm_eval/models/huggingface.py `HFLM`, lm_eval/api/task.py `ConfigurableTask.process_results`,
lm_eval/api/metrics.py, lm_eval/utils.py, lm_eval/filters/extraction.py), so a change there can
be followed here. The harness (harness.py) and the lm-eval backend (lm_eval_backend.py) both score
through these, so the two cannot drift apart.

Where lm-eval leaves something open and we decided:
- lm-eval's hf backend encodes with the tokenizer's own special tokens (`add_bos_token`
  unset): we encode with the tokenizer's `add_bos`, the same for an imported model.
- The token an empty context conditions on (and the rolling windows' first): HFLM's
  `prefix_token_id`, BOS if the tokenizer has one, else EOS, for imported models; for a
  tokenizer llm_jax trained, EOS, because training separates documents with EOS and never shows
  the model a BOS (engine.Scorer.prefix_id; pass HFLM `prefix_token_id=` the same id to compare
  an exported model).
- The CORE-style aggregate (nanochat's `core_eval`, DCLM's CORE) centres each task's accuracy by
  its chance level and averages over the tasks run; lm-eval has no such aggregate. For tasks
  whose headline metric is not an accuracy (perplexities), nothing is centred and they are left
  out of the aggregate.
"""

import math
import re
import string as string_lib
from typing import Callable, Sequence

import numpy as np

from llm_jax import errors


# ------------------------------------------------------------------------------- tokenization


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_id: int, encode_plain: Callable[[str], list[int]] | None = None,
                move_space: bool = True) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as `TemplateLM.loglikelihood` and `_encode_pair` make them.

  Trailing whitespace of the context moves to the continuation (word-boundary tokenization);
  the whole string is encoded and split at the context's length, so the continuation's ids are
  those of the joined text. An empty context conditions on `prefix_id`, the continuation then
  encoded without special tokens (`encode_plain`, default `encode`), unless it starts with
  prefix_id itself. move_space=False keeps the context's trailing whitespace where it is: for
  our own tasks, whose contexts end at a line's end, where the corpus's tokenizer has a clean
  token boundary that lm-eval's move would cut (".\n" becomes "." then "\n").
  """
  if context == "":
    cont = (encode_plain or encode)(continuation)
    if cont and cont[0] == prefix_id:
      return cont[:1], cont[1:]
    return [prefix_id], cont
  n_spaces = len(context) - len(context.rstrip()) if move_space else 0
  if n_spaces > 0:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  whole = encode(context + continuation)
  ctx = encode(context)
  return ctx, whole[len(ctx):]


def model_row(context_ids: Sequence[int], continuation_ids: Sequence[int], max_length: int
              ) -> tuple[list[int], list[int], int, bool]:
  """(inputs, targets, n scored, truncated) of one loglikelihood request, as HFLM builds it.

  inputs = (context + continuation)[-(max_length + 1):][:-1]: the joined ids truncated from the
  left to max_length + 1, less the last; targets are the same ids shifted by one; the last
  len(continuation) targets are scored. Raises ValueError for an empty continuation or one longer
  than max_length (lm-eval asserts both).
  """
  if not continuation_ids:
    raise errors.UserError("an empty continuation has nothing to score")
  if len(continuation_ids) > max_length:
    raise errors.UserError(f"a continuation of {len(continuation_ids)} tokens is longer than the "
                           f"model's context of {max_length} tokens")
  whole = list(context_ids) + list(continuation_ids)
  kept = whole[-(max_length + 1):]
  return kept[:-1], kept[1:], len(continuation_ids), len(whole) > max_length + 1


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int
                    ) -> list[tuple[list[int], list[int]]]:
  """Disjoint (context, predicted) windows of a whole document, lm-eval's rolling definition:
  `utils.get_rolling_token_windows(context_len=1)` then `utils.make_disjoint_window`.

  The first window predicts the first min(max_length, n) tokens from prefix_id; each later one
  predicts the next max_length tokens (fewer at the end) given the max_length tokens before its
  last, so every token is predicted exactly once and the windows' log-likelihoods sum to the
  document's.
  """
  tokens = list(tokens)
  out = []
  if not tokens:
    return out
  first = min(max_length, len(tokens))
  pairs = [([prefix_id] + tokens[:first - 1], tokens[:first])]
  predicted = first
  while predicted < len(tokens):
    n = min(len(tokens) - predicted, max_length)
    end = predicted + n
    pairs.append((tokens[max(end - max_length - 1, 0):end - 1], tokens[end - n:end]))
    predicted += n
  for ctx, pred in pairs:
    out.append((ctx[:len(ctx) - (len(pred) - 1)], pred))
  return out


# ------------------------------------------------------------------------------- per-item metrics


def multiple_choice(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
  """acc and acc_norm of one item (`ConfigurableTask.process_results`, multiple_choice).

  acc: argmax of the summed log-likelihoods is gold; acc_norm: argmax of each sum divided by its
  choice's length in characters (the choice text as doc_to_choice gives it, without the target
  delimiter). np.argmax takes the first of equal scores, as lm-eval does.
  """
  lls = np.asarray(lls, np.float64)
  lengths = np.array([float(len(c)) for c in choices])
  pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
  return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred,
          "pred_norm": pred_norm}


def count_words(text: str) -> int:
  """`Task.count_words`: pieces of re.split(r"\\s+") (so leading/trailing space counts one)."""
  return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
  return len(text.encode("utf-8"))


# ------------------------------------------------------------------------------- aggregations


def mean(values) -> float:
  values = list(values)
  return float(sum(values) / len(values)) if values else float("nan")


def perplexity(lls) -> float:
  """lm-eval's `perplexity` aggregation: exp(-mean(per-item log-likelihood))."""
  return math.exp(-mean(lls))


def rolling_metrics(lls, words, bytes_) -> dict:
  """word_perplexity, byte_perplexity and bits_per_byte over documents (`weighted_perplexity`:
  exp(-sum ll / sum words) and exp(-sum ll / sum bytes); `bits_per_byte`: -sum ll / sum bytes /
  ln 2)."""
  ll, w, b = float(sum(lls)), float(sum(words)), float(sum(bytes_))
  return {"word_perplexity": math.exp(-ll / w), "byte_perplexity": math.exp(-ll / b),
          "bits_per_byte": -ll / b / math.log(2)}


# ------------------------------------------------------------------------------- generation


def cut_at_stops(text: str, until: Sequence[str]) -> str:
  """`postprocess_generated_text`: the text before the first occurrence of each stop sequence,
  applied in order (empty stop strings ignored)."""
  for term in until:
    if term:
      text = text.split(term)[0]
  return text


def regex_extract(text: str, pattern: str, group_select: int = 0,
                  fallback: str = "[invalid]") -> str:
  """lm-eval's `regex` filter (then take_first): findall's `group_select`-th match; of a tuple of
  groups the first non-empty one; stripped; `fallback` when nothing matches."""
  found = re.findall(pattern, text)
  if not found:
    return fallback
  match = found[group_select]
  if isinstance(match, tuple):
    match = next((m for m in match if m), None)
    if match is None:
      return fallback
  return match.strip()


def exact_match(prediction: str, reference: str, regexes_to_ignore=(), ignore_case=False,
                ignore_punctuation=False) -> float:
  """`exact_match_hf_evaluate` for one pair: each regex removed from both, then case and
  punctuation folded as asked, then string equality."""
  for r in regexes_to_ignore:
    prediction, reference = re.sub(r, "", prediction), re.sub(r, "", reference)
  if ignore_case:
    prediction, reference = prediction.lower(), reference.lower()
  if ignore_punctuation:
    table = str.maketrans("", "", string_lib.punctuation)
    prediction, reference = prediction.translate(table), reference.translate(table)
  return float(prediction == reference)


# ------------------------------------------------------------------------------- aggregate


def centred(acc: float, chance: float) -> float:
  """(acc - chance) / (1 - chance): 0 at chance, 1 when every item is right."""
  return (acc - chance) / (1.0 - chance)


def core_score(results: dict) -> float | None:
  """The mean of centred accuracies over the tasks that have one (`results`: task -> a dict
  with "centred"); None when none has."""
  values = [r["centred"] for r in results.values() if r.get("centred") is not None]
  return mean(values) if values else None
