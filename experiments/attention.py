"""Attention study: the attention maps of a trained model, per layer and head (the cheat sheet's
"self-attention determines how words influence each other").

    python -m experiments.attention --out=results/attention              # trains <out>/model first
    python -m experiments.attention --out=results/attention --workdir=runs/default
    python -m experiments.attention --out=results/attention --workdir=runs/default \\
        --prompt="KING HENRY:\\nOnce more unto the breach, dear friends"

The probabilities are the model's own: layers.SelfAttention sows them into the "intermediates"
collection when a caller makes it mutable (here, and nowhere in training or sampling), from the
same forward pass that gives the logits. For the prompt (after an EOS, as every training
document starts): a grid of heatmaps, one per layer and head, query tokens down, key tokens
across. Over validation rows of block_size tokens, per head: the entropy of each query's
distribution, the mean distance it looks back, and the share of attention on the previous
token, the first token of the row, and the query itself.
"""

import functools
import os
import time

import jax
import numpy as np

from experiments import common
from experiments import embeddings
from llm_jax import data as data_lib
from llm_jax import model as model_lib

PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?"
EVAL_ROWS = 8  # validation rows the per-head statistics average over


@functools.lru_cache(maxsize=None)
def _probs_fn(model_cfg):
  model = model_lib.build(model_cfg)

  @jax.jit
  def probs(params, tokens_BT):
    _, state = model.apply({"params": params}, tokens_BT, mutable=["intermediates"])
    return state["intermediates"]
  return probs


def attention_probs(model_cfg, params, tokens_BT) -> np.ndarray:
  """[L, B, N, T, T] float32: every layer's attention probabilities for tokens_BT."""
  inter = jax.device_get(_probs_fn(model_cfg)(params, np.asarray(tokens_BT, np.int32)))
  if "layers" in inter:  # scan_layers: one entry stacked over layers
    return np.asarray(inter["layers"]["attn"]["attention_probs"][0])
  n_layers = model_cfg.n_layers
  return np.stack([inter[f"blocks_{i}"]["attn"]["attention_probs"][0] for i in range(n_layers)])


def head_statistics(probs_LBNTS) -> list[dict]:
  """Per layer and head, averaged over rows and over queries t >= 1 (query 0 sees only itself)."""
  l, _, n, t, s = probs_LBNTS.shape
  p = probs_LBNTS[:, :, :, 1:, :].astype(np.float64)  # [L, B, N, T-1, S]
  q = np.arange(1, t)[:, None]
  k = np.arange(s)[None, :]
  entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
  distance = (p * (q - k)).sum(-1)
  prev = p[..., np.arange(t - 1), np.arange(t - 1)]  # key t - 1 for query t
  first = p[..., 0]
  own = p[..., np.arange(t - 1), np.arange(1, t)]
  rows = []
  for layer in range(l):
    for head in range(n):
      stat = {name: float(x[layer, :, head].mean()) for name, x in (
          ("entropy (nats)", entropy), ("mean distance", distance), ("previous token", prev),
          ("first token", first), ("self", own))}
      shares = {k: stat[k] for k in ("previous token", "first token", "self")}
      top = max(shares, key=shares.get)
      stat["pattern"] = top if shares[top] >= 0.5 else "spread"
      rows.append({"layer": layer, "head": head, **stat})
  return rows


def study(base, out: str, *, prompt: str = PROMPT, workdir: str | None = None,
          command_line: str = "") -> common.Result:
  started = time.time()
  cfg = common.finalize(base)
  model = common.trained_model(cfg, out, workdir)
  tok = model.tokenizer
  ids = [tok.eos_id] + tok.encode(prompt)
  if len(ids) > cfg.block_size:
    raise common.StudyError(f"--prompt is {len(ids)} tokens with the leading EOS, more than "
                            f"block_size={cfg.block_size}: shorten it")
  labels = ["<eos>"] + [embeddings.readable(tok.id_to_piece(i)) for i in ids[1:]]
  # One forward pass: validation rows of block_size tokens, and the prompt padded on the right
  # to the same length (causal: the padding changes nothing the prompt's queries see).
  rows_BT = next(data_lib.build(cfg, model.workdir).eval_batches(1))["inputs"][:EVAL_ROWS]
  prompt_T = np.zeros(rows_BT.shape[1], np.int32)
  prompt_T[:len(ids)] = ids
  probs = attention_probs(model.model_cfg, model.params, np.concatenate([rows_BT, prompt_T[None]]))
  maps = probs[:, -1, :, :len(ids), :len(ids)]  # [L, N, T, T] of the prompt
  rows = head_statistics(probs[:, :-1])

  fig_maps = _maps_figure(maps, labels, cfg)
  fig_heads = _heads_figure(rows, cfg, len(rows_BT))
  intro = (f"The model in {model.workdir} (step {model.step}, {cfg.n_layers} layers x "
           f"{cfg.n_heads} heads). Maps: the prompt {prompt!r} after an EOS ({len(ids)} "
           f"tokens). Table and scatter: each head over {len(rows_BT)} validation rows of "
           f"{rows_BT.shape[1]} tokens, averaged over queries 1..T-1: the entropy of the "
           f"attention distribution, the mean distance looked back (tokens), and the share "
           f"of attention on the previous token, the row's first token and the query itself. "
           f"Pattern: the one of those three holding at least half of the attention, else "
           f"spread.")
  columns = ["layer", "head", "entropy (nats)", "mean distance", "previous token", "first token",
             "self", "pattern"]
  return common.write_report(
      out, title="Attention maps per layer and head", intro=intro, columns=columns, rows=rows,
      figures={"attention_maps.png": fig_maps, "attention_heads.png": fig_heads},
      captions={"attention_maps.png": "Attention probabilities for the prompt, one heatmap per "
                                      "layer (rows) and head (columns): query tokens down, the "
                                      "key tokens they attend to across; causal, so the upper "
                                      "triangle is empty.",
                "attention_heads.png": "Every head over validation rows: how far back it looks "
                                       "against how spread its attention is; colour = layer."},
      runs=[model.run] if model.run else [], command_line=command_line, started=started,
      extra={"maps": maps, "labels": labels})


def _maps_figure(maps, labels, cfg):
  n_layers, n_heads, t, _ = maps.shape
  size = min(3.2, max(1.9, 0.14 * t))
  fig, axes = common.figure(n_layers * n_heads, ncols=n_heads, panel_size=(size, size),
                            title="Attention probabilities per layer (rows) and head (columns)")
  font = max(4, min(7, 160 / t))
  image = None
  for layer in range(n_layers):
    for head in range(n_heads):
      ax = axes[layer * n_heads + head]
      image = ax.imshow(maps[layer, head], vmin=0.0, vmax=1.0, cmap="viridis",
                        interpolation="nearest")
      ax.set_title(f"layer {layer}, head {head}", fontsize=8)
      ax.set_xticks(range(t))
      ax.set_yticks(range(t))
      ax.set_xticklabels(labels if layer == n_layers - 1 else [], rotation=90, fontsize=font)
      ax.set_yticklabels(labels if head == 0 else [], fontsize=font)
      if layer == n_layers - 1:
        ax.set_xlabel("key token (attended to)", fontsize=7)
      if head == 0:
        ax.set_ylabel("query token", fontsize=7)
  fig.set_layout_engine("constrained")  # makes room for the shared colour bar
  cbar = fig.colorbar(image, ax=axes, shrink=0.6, pad=0.02)
  cbar.set_label("attention probability")
  return fig


def _heads_figure(rows, cfg, n_rows):
  fig, (ax,) = common.figure(1, panel_size=(6.5, 4.5), title=(
      f"Attention heads over {n_rows} validation rows of {cfg.block_size} tokens"))
  for layer in sorted({r["layer"] for r in rows}):
    pts = [r for r in rows if r["layer"] == layer]
    ax.plot([r["mean distance"] for r in pts], [r["entropy (nats)"] for r in pts], "o",
            color=f"C{layer % 10}", label=f"layer {layer}")
    for r in pts:
      ax.annotate(f"h{r['head']}", (r["mean distance"], r["entropy (nats)"]), fontsize=6,
                  textcoords="offset points", xytext=(3, 2))
  common.style(ax, "How far back and how spread", "mean distance looked back (tokens)",
               "entropy of the attention distribution (nats)", legend=7)
  return fig


def main(argv):
  del argv
  base = common.study_config(common.MODEL_PRESETS[common.scale()])
  study(base, common.out_dir(), prompt=common.prompt_flag(PROMPT),
        workdir=common.workdir_flag(), command_line=common.command("attention"))


if __name__ == "__main__":
  common.run_main(main)
