"""Task definitions and readers: a task file's records -> items with lm-eval's prompts.

Each standard task renders a record of its Hugging Face Hub dataset (the Hub's field names) the
way its lm-eval YAML / utils.py does (lm_eval/tasks/<task>/): the same doc_to_text, doc_to_choice,
doc_to_target, target delimiter " " and few-shot delimiter "\\n\\n". Files are read through
records.py (.jsonl/.json, .parquet, .arrow, `save_to_disk` folders), found by name in tasks_dir
(`hellaswag.jsonl`, `hellaswag.json`, `hellaswag.parquet`, `hellaswag/`) or given as name=/path.

A generic task (any other name, given with its path) is told by its first record's fields:
  context + choices + label   multiple choice (continuation " " + choice)
  context + target            cloze: acc = the greedy continuation is the target; perplexity
  context + answer [+ until]  generation: exact match of the stripped text
  text                        rolling log-likelihood of the whole text
and a plain .txt file, or a folder of them, is a rolling task with one document per file.

Few-shot (num_fewshot): examples drawn with random.Random(1234) (lm-eval's default fewshot seed)
from a DatasetDict's training split when there is one (lm-eval's training_split /
fewshot_split), else from the evaluated records themselves, sampling n + 1 and dropping the item
(lm-eval's ContextSampler). The draws follow the items in order from one generator, as lm-eval's
do. Rolling tasks take no few-shot examples (lm-eval refuses them too).

Decided here, open in lm-eval: a DatasetDict folder is evaluated on the split lm-eval uses
(test_split if the task has one, else validation_split); a file is evaluated whole.
"""

import dataclasses
import glob
import os
import random
import re
from typing import Callable

from llm_jax import errors
from llm_jax import records

FEWSHOT_SEED = 1234
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
_EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow", ".jsonl.gz", ".jsonl.zst")


class TaskError(errors.UserError):
  """A task name, file or record that cannot be evaluated; names the task, file and fix."""


@dataclasses.dataclass
class Item:
  """One evaluated document. `requests` are (context, continuation) pairs for loglikelihood
  kinds, the context alone for generation, the text for rolling; filled in by `build`."""
  query: str  # doc_to_text (partial scoring: unused; its contexts are the choices)
  choices: list[str] | None = None  # doc_to_choice: the texts acc_norm measures
  gold: int = 0
  target: str = ""  # cloze continuation, generation reference, rolling text
  partial: bool = False  # WinoGrande: choices fill the blank; target is the shared remainder
  words: int | None = None  # rolling: counted on the original text (wikitext)
  bytes: int | None = None
  requests: list = dataclasses.field(default_factory=list)

  def solved(self, delimiter: str = TARGET_DELIMITER) -> str:
    """This item as a few-shot example: the question, the delimiter, its answer."""
    if self.partial:
      return self.choices[self.gold] + delimiter + self.target
    if self.choices is not None:
      return self.query + delimiter + self.choices[self.gold]
    return self.query + delimiter + self.target  # lm-eval: lambada's few-shot has two spaces


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str  # multiple_choice | cloze | rolling | generate
  fields: tuple  # fields a record needs ("a.b": b inside the mapping a)
  render: Callable[[dict], Item]
  metrics: tuple
  headline: str | None  # the metric centred for the aggregate (None: not an accuracy)
  eval_split: str = "validation"
  fewshot_split: str | None = "train"
  until: tuple = ()  # generation stop sequences
  answer: dict | None = None  # generation: the filters and exact-match options
  delimiter: str = TARGET_DELIMITER  # between the context and a choice (lm-eval's target_delimiter)
  description: str = ""
  # lm-eval's ContextSampler draws n + 1 examples and drops the evaluated item (then keeps n)
  # exactly when the YAML's fewshot_split equals its test_split, both unset included; otherwise
  # it draws n, even from the evaluated items themselves (lambada_openai): the draws differ
  fewshot_extra: bool = True
  move_space: bool = True  # lm-eval's _encode_pair moves the context's trailing space (scoring.py)


# ------------------------------------------------------------------------------ the Hub tasks


def _hellaswag_pre(text: str) -> str:
  """lm_eval/tasks/hellaswag/utils.py `preprocess`: WikiHow's bracket artifacts removed."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def _hellaswag(d):
  ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
  return Item(_hellaswag_pre(d["activity_label"] + ": " + ctx),
              [_hellaswag_pre(e) for e in d["endings"]], int(d["label"]))


def _arc(d):
  return Item(f"Question: {d['question']}\nAnswer:", list(d["choices"]["text"]),
              _index(d["choices"]["label"], d["answerKey"], "answerKey"))


def _openbookqa(d):
  return Item(d["question_stem"], list(d["choices"]["text"]),
              _index(d["choices"]["label"], d["answerKey"].lstrip(), "answerKey"))


def _piqa(d):
  return Item(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))


def _sciq(d):
  return Item(f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
              [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)


def _boolq(d):
  return Item(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"],
              int(d["label"]))


def _copa(d):
  """super_glue/copa/utils.py: the premise without its period, a connector, the choice
  lower-cased at its first letter (doc_to_choice puts the space in the choice, so the
  delimiter is still " ": lm-eval's continuation is "  because"-style double space)."""
  connector = {"cause": "because", "effect": "therefore"}[d["question"]]
  conv = lambda c: " " + c[0].lower() + c[1:]
  return Item(d["premise"].strip()[:-1] + f" {connector}", [conv(d["choice1"]),
              conv(d["choice2"])], int(d["label"]))


def _winogrande(d):
  """preprocess_winogrande.py: each option fills the blank (the contexts); the rest of the
  sentence after the blank is the one continuation scored."""
  s = d["sentence"]
  if "_" not in s:
    raise ValueError("field 'sentence' has no blank '_' to fill")
  idx = s.index("_")
  answer = str(d["answer"])
  if answer not in ("1", "2"):
    raise ValueError(f"field 'answer' is {d['answer']!r}: it must be '1' or '2'")
  return Item("", [s[:idx] + d["option1"], s[:idx] + d["option2"]], int(answer) - 1,
              target=s[idx + 1:].strip(), partial=True)


def _lambada(d):
  words = d["text"].split(" ")
  return Item(" ".join(words[:-1]), target=" " + words[-1])


def _wikitext_detokenize(string: str) -> str:
  """lm_eval/tasks/wikitext/preprocess_wikitext.py `wikitext_detokenizer`."""
  string = string.replace("s '", "s'")
  string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
  string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
  for p in (":", ";", ".", "!", "?", ","):
    string = string.replace(f" {p} ", f"{p} ")
  string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
  string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
  string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
  string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
  string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
  string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
  string = string.replace(" " + chr(176) + " ", chr(176))
  string = string.replace(" \n", "\n").replace("\n ", "\n")
  string = string.replace(" N ", " 1 ").replace(" 's", "'s")
  return string


def _wikitext(d):
  from llm_jax.evals import scoring
  # process_results counts words and bytes of the page before detokenization
  return Item("", target=_wikitext_detokenize(d["page"]), words=scoring.count_words(d["page"]),
              bytes=scoring.count_bytes(d["page"]))


def _gsm8k(d):
  return Item(f"Question: {d['question']}\nAnswer:", target=d["answer"])


_GSM8K_ANSWER = {
    "filters": {"strict-match": (r"#### (\-?[0-9\.\,]+)", 0),
                "flexible-extract": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)},
    "regexes_to_ignore": (",", "\\$", "(?s).*#### ", "\\.$"), "ignore_case": True,
    "ignore_punctuation": False}
_MC = ("acc", "acc_norm")

STANDARD = {t.name: t for t in (
    Task("hellaswag", "multiple_choice", ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
         _hellaswag, _MC, "acc_norm", "validation", "train"),
    Task("arc_easy", "multiple_choice", ("question", "choices.text", "choices.label",
                                         "answerKey"), _arc, _MC, "acc_norm", "test", "train",
         fewshot_extra=False),
    Task("arc_challenge", "multiple_choice", ("question", "choices.text", "choices.label",
                                              "answerKey"), _arc, _MC, "acc_norm", "test",
         "train",
         fewshot_extra=False),
    Task("piqa", "multiple_choice", ("goal", "sol1", "sol2", "label"), _piqa, _MC, "acc_norm",
         "validation", "train"),
    Task("openbookqa", "multiple_choice", ("question_stem", "choices.text", "choices.label",
                                           "answerKey"), _openbookqa, _MC, "acc_norm", "test",
         "train",
         fewshot_extra=False),
    Task("sciq", "multiple_choice", ("support", "question", "distractor1", "distractor2",
                                     "distractor3", "correct_answer"), _sciq, _MC, "acc_norm",
         "test", "train",
         fewshot_extra=False),
    Task("boolq", "multiple_choice", ("passage", "question", "label"), _boolq, ("acc",), "acc",
         "validation", "train"),
    Task("copa", "multiple_choice", ("premise", "question", "choice1", "choice2", "label"), _copa,
         ("acc",), "acc", "validation", "train"),
    Task("winogrande", "multiple_choice", ("sentence", "option1", "option2", "answer"),
         _winogrande, ("acc",), "acc", "validation", "train"),
    Task("lambada_openai", "cloze", ("text",), _lambada, ("acc", "perplexity"), "acc", "test",
         None, fewshot_extra=False),
    Task("wikitext", "rolling", ("page",), _wikitext, ("word_perplexity", "byte_perplexity",
                                                       "bits_per_byte"), None, "test", None),
    Task("gsm8k", "generate", ("question", "answer"), _gsm8k,
         ("exact_match_strict", "exact_match_flexible"), "exact_match_strict", "test", "train",
         until=("Question:", "</s>", "<|im_end|>"), answer=_GSM8K_ANSWER, fewshot_extra=False),
)}


# ------------------------------------------------------------------------------ generic tasks


def _generic_choice(d):
  return Item(d["context"], [str(c) for c in d["choices"]], _int_label(d["label"]))


def _generic_cloze(d):
  return Item(d["context"], target=d["target"])


def _generic_generate(d):
  return Item(d["context"], target=str(d["answer"]))


def _generic_rolling(d):
  return Item("", target=d["text"])


def generic(name: str, first: dict | None, where: str) -> Task:
  """The generic task a file's first record describes (see the module docstring)."""
  have = set(first or ())
  if {"context", "choices", "label"} <= have:
    return Task(name, "multiple_choice", ("context", "choices", "label"), _generic_choice, _MC,
                "acc", fewshot_split=None)
  if {"context", "target"} <= have:
    return Task(name, "cloze", ("context", "target"), _generic_cloze, ("acc", "perplexity"),
                "acc", fewshot_split=None)
  if {"context", "answer"} <= have:
    until = tuple(first.get("until") or ())
    return Task(name, "generate", ("context", "answer"), _generic_generate, ("exact_match",),
                "exact_match", fewshot_split=None, until=until,
                answer={"filters": {}, "regexes_to_ignore": (), "ignore_case": False,
                        "ignore_punctuation": False, "strip": True})
  if "text" in have:
    return Task(name, "rolling", ("text",), _generic_rolling, STANDARD["wikitext"].metrics, None,
                fewshot_split=None)
  raise TaskError(f"{where}: task {name!r} is not one llm_jax knows, and its records have "
                  f"fields {', '.join(map(repr, sorted(have))) or 'none'}: a generic task file "
                  f"needs context+choices+label (multiple choice), context+target (cloze), "
                  f"context+answer (generation) or text (rolling perplexity)")


# ------------------------------------------------------------------------------ helpers


def _index(labels, key, name):
  labels = list(labels)
  if key not in labels:
    raise ValueError(f"field {name!r} is {key!r}, not one of the choice labels {labels}")
  return labels.index(key)


def _int_label(value):
  if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
    raise ValueError(f"field 'label' is {value!r}: it must be a choice index 0, 1, ...")
  return int(value)


def _check_fields(record: dict, fields, where: str) -> None:
  for f in fields:
    head, _, rest = f.partition(".")
    value = records.field(record, head, where)
    if rest and (not isinstance(value, dict) or rest not in value):
      raise TaskError(f"{where}: field {head!r} has no {rest!r} (the Hub's {f})")


# ------------------------------------------------------------------------------ finding files


def parse_spec(spec: str) -> list[tuple[str, str | None]]:
  """'hellaswag,mine=/data/x.jsonl' -> [("hellaswag", None), ("mine", "/data/x.jsonl")]."""
  out = []
  for part in [p.strip() for p in (spec or "").split(",") if p.strip()]:
    name, _, path = part.partition("=")
    out.append((name.strip(), path.strip() or None))
  return out


def find(name: str, tasks_dir: str | None) -> str | None:
  """The file or folder of task `name` in tasks_dir, or None."""
  if not tasks_dir:
    return None
  for ext in _EXTENSIONS + ("",):
    path = os.path.join(tasks_dir, name + ext)
    if (ext and os.path.isfile(path)) or (not ext and os.path.isdir(path)):
      return path
  return None


def available(tasks_dir: str | None) -> list[str]:
  """Task names present in tasks_dir."""
  if not tasks_dir or not os.path.isdir(tasks_dir):
    return []
  names = set()
  for entry in os.listdir(tasks_dir):
    for ext in _EXTENSIONS:
      if entry.endswith(ext):
        names.add(entry[:-len(ext)])
    if os.path.isdir(os.path.join(tasks_dir, entry)):
      names.add(entry)
  return sorted(names)


def _split_of(path: str, split: str | None) -> str | None:
  """`split` if path is a DatasetDict folder that has it, else None."""
  dd = os.path.join(path, "dataset_dict.json")
  if split and os.path.isfile(dd):
    import json  # pylint: disable=import-outside-toplevel
    with open(dd, encoding="utf-8") as f:
      if split in json.load(f).get("splits", []):
        return split
  return None


def _text_files(path: str) -> list[str] | None:
  if os.path.isfile(path) and path.endswith(".txt"):
    return [path]
  if os.path.isdir(path) and records.kind(path) is None:
    return sorted(glob.glob(os.path.join(path, "*.txt"))) or None
  return None


def _dict_splits(path: str) -> list[str]:
  dd = os.path.join(path, "dataset_dict.json")
  if not os.path.isfile(dd):
    return []
  import json  # pylint: disable=import-outside-toplevel
  with open(dd, encoding="utf-8") as f:
    return list(json.load(f).get("splits", []))


def _read(path: str, split: str | None) -> list[tuple[str, dict]]:
  if not os.path.exists(path):
    raise TaskError(f"{path}: no such file or folder")
  splits = _dict_splits(path)
  if splits and split not in splits:
    split = next((s for s in ("test", "validation") if s in splits), None)
  return records.read_records(path, split=split if splits else None)


def _render(task: Task, rows, path: str) -> list[Item]:
  items = []
  for where, record in rows:
    _check_fields(record, task.fields, where)
    try:
      item = task.render(record)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
      raise TaskError(f"{where}: task {task.name!r} cannot use this record ({e})") from None
    if item.choices is not None:
      if len(item.choices) < 2:
        raise TaskError(f"{where}: {len(item.choices)} choice(s); a multiple-choice item needs "
                        f"at least 2")
      if not 0 <= item.gold < len(item.choices):
        raise TaskError(f"{where}: label {item.gold} is out of range for its "
                        f"{len(item.choices)} choices (0 .. {len(item.choices) - 1})")
    if task.kind == "cloze" and not item.target:
      raise TaskError(f"{where}: an empty target: a cloze item needs a continuation to score")
    items.append(item)
  if not items:
    raise TaskError(f"{path}: no records: task {task.name!r} has nothing to evaluate")
  return items


def load(name: str, path: str | None, tasks_dir: str | None, known_builtin=()
         ) -> tuple[Task, list[Item], list[Item] | None, str]:
  """(task, items, few-shot pool or None = the items themselves, the path read)."""
  path = path or find(name, tasks_dir)
  if path is None:
    known = sorted(set(STANDARD) | set(known_builtin) | set(available(tasks_dir)))
    order = sorted(known, key=lambda k: _distance(name, k))
    where = (f"no file {name}.jsonl/.json/.parquet or folder {name}/ in tasks_dir={tasks_dir}"
             if tasks_dir else "no tasks_dir is set")
    raise TaskError(f"unknown task {name!r} ({where}); known tasks, closest first: "
                    f"{', '.join(order)}. Give a file as {name}=/path/to/file")
  texts = _text_files(path)
  if texts is not None:
    task = generic(name, {"text": ""}, path)
    items = []
    for f in texts:
      with open(f, encoding="utf-8") as fh:
        items.append(Item("", target=fh.read()))
    if not any(i.target for i in items):
      raise TaskError(f"{path}: the text files are empty: task {name!r} has nothing to evaluate")
    return task, items, None, path
  rows = _read(path, STANDARD[name].eval_split if name in STANDARD else None)
  if not rows:
    raise TaskError(f"{path}: no records: task {name!r} has nothing to evaluate")
  task = STANDARD.get(name) or generic(name, rows[0][1], rows[0][0])
  items = _render(task, rows, path)
  pool = None
  split = _split_of(path, task.fewshot_split)
  if split is not None:
    pool = _render(task, records.read_records(path, split=split), f"{path}/{split}")
  return task, items, pool, path


def _distance(a: str, b: str) -> tuple:
  import difflib  # pylint: disable=import-outside-toplevel
  return (-difflib.SequenceMatcher(None, a, b).ratio(), b)


# ------------------------------------------------------------------------------ requests


def build(task: Task, items: list[Item], pool: list[Item] | None, num_fewshot: int) -> None:
  """Fills each item's requests, with num_fewshot solved examples before it (module docstring).

  pool: the few-shot examples (a training split), or None to draw them from `items`, which is
  then the whole evaluated set (before tasks_limit: lm-eval's --limit keeps the pool whole).
  Only the items' first `limit` get requests when the caller cuts the list afterwards; the draws
  follow the items in order, so the first items' contexts do not depend on the limit.
  """
  rnd = random.Random(FEWSHOT_SEED)
  own = pool is None
  shots_from = items if own else pool
  # the items themselves where lm-eval has a split we were not given: always n + 1, the item out
  extra = task.fewshot_extra or (own and task.fewshot_split is not None)
  exclude = own and extra
  if task.kind != "rolling" and num_fewshot and len(shots_from) - exclude < num_fewshot:
    raise TaskError(f"num_fewshot={num_fewshot}: task {task.name!r} has only "
                    f"{len(shots_from) - exclude} {'other ' if exclude else ''}items to draw "
                    f"examples from")
  for item in items:
    prefix = ""
    if task.kind != "rolling" and num_fewshot:
      if extra:
        drawn = rnd.sample(range(len(shots_from)), num_fewshot + 1)
        shots = [shots_from[i] for i in drawn if shots_from[i] is not item][:num_fewshot]
      else:
        shots = [shots_from[i] for i in rnd.sample(range(len(shots_from)), num_fewshot)]
      prefix = "".join(s.solved(task.delimiter) + FEWSHOT_DELIMITER for s in shots)
    if task.kind == "rolling":
      item.requests = [item.target]
    elif task.kind == "generate":
      item.requests = [prefix + item.query]
    elif task.kind == "cloze":
      item.requests = [(prefix + item.query, item.target)]
    elif item.partial:
      item.requests = [(prefix + c, task.delimiter + item.target) for c in item.choices]
    else:
      item.requests = [(prefix + item.query, task.delimiter + c) for c in item.choices]


def chance(task: Task, items: list[Item]) -> float | None:
  """The task's chance level of its headline metric: the mean of 1 / choices for multiple
  choice, 0 for cloze and generation (an exact string), None for perplexities."""
  if task.headline is None:
    return None
  if task.kind == "multiple_choice":
    return sum(1.0 / len(i.choices) for i in items) / len(items)
  return 0.0
