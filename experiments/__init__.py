"""Runnable studies of the cheat sheet's experiment ideas; `python -m experiments.<study> --out=DIR`.

Each study trains ordinary llm_jax workdirs under --out with the project's own Trainer, data,
sampler and checkpoints, and writes report.md, results.json and PNGs there (see common.py).
"""
