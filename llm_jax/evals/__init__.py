"""Downstream evaluation, scored as lm-evaluation-harness scores it.

  scoring.py         pure functions: lm-eval's tokenization of requests, rolling windows, metrics
  tasks.py           task definitions (lm-eval's prompts over the Hub's field names) and readers
  builtin.py         offline tasks on the held-out plays of the embedded corpus
  engine.py          the model as lm-eval's LM API sees it: batched log-likelihoods, generation
  harness.py         --mode=tasks: prepare, score, report
  lm_eval_backend.py an lm_eval.api.model.LM over llm_jax models (the [eval] extra)
"""
