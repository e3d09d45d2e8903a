"""Embeddings study: what a trained model keeps in its weight matrices (the cheat sheet's
"visualize embeddings" and "how trained models store knowledge as weight matrices").

    python -m experiments.embeddings --out=results/embeddings             # trains <out>/model first
    python -m experiments.embeddings --out=results/embeddings --workdir=runs/default
    python -m experiments.embeddings --out=results/embeddings --workdir=runs/default \\
        --probe_words=king,love,night --label_tokens=60

Three views of the trained parameters:
  * the token embeddings projected on their first two principal components (PCA of the centred
    [vocab, d_model] matrix), the most frequent training tokens labelled;
  * the nearest neighbours (cosine similarity of embedding rows) of a few probe words;
  * the singular values of every weight matrix (attention projections flattened to
    [d_model, heads * head_dim], FFN kernels, the embedding) against the same matrix at its
    random initialisation, which is the run's own: model.init_params(model_cfg, seed) draws
    exactly what Trainer.init_state(seed) drew. Training concentrates a matrix's energy in a few directions: the top singular
    values grow, the effective rank exp(entropy of sigma / sum sigma) (Roy & Vetterli 2007)
    and the stable rank ||W||_F^2 / sigma_max^2 fall.
"""

import os
import re
import time

from absl import flags
import jax
import numpy as np

from experiments import common
from llm_jax import data as data_lib
from llm_jax import metrics as metrics_lib
from llm_jax import model as model_lib

_PROBE_WORDS = flags.DEFINE_list(
    "probe_words", None, "embeddings: words whose nearest neighbours are listed (default: "
    "king,queen,lord,love,hate,death,night,day,sweet,good,thou,he)")
_LABEL_TOKENS = flags.DEFINE_integer("label_tokens", 40, "embeddings: label this many of the "
                                     "most frequent training tokens in the PCA plot")

PROBE_WORDS = ("king", "queen", "lord", "love", "hate", "death", "night", "day", "sweet", "good",
               "thou", "he")
NEIGHBOURS = 6
WORD_START = "\u2581"  # sentencepiece's word-boundary mark
CLASSES = ("word start, lowercase", "word start, capitalised", "inside a word",
           "punctuation, digits, other")


def token_class(piece: str) -> str:
  """Which of CLASSES a sentencepiece piece belongs to."""
  word = piece[1:] if piece.startswith(WORD_START) else piece
  if not word or not word[0].isalpha():
    return CLASSES[3]
  if not piece.startswith(WORD_START):
    return CLASSES[2]
  return CLASSES[1] if word[0].isupper() else CLASSES[0]


def readable(piece: str) -> str:
  return piece.replace(WORD_START, "_").replace("\n", "\\n")


def weight_matrices(params, vocab_size: int) -> dict:
  """{name: 2-D float64 array} of every kernel and embedding table, one per layer.

  Attention q/k/v kernels [D, N, H] become [D, N*H], the output kernel [N, H, D] becomes
  [N*H, D]; embedding tables keep their real vocabulary rows; a scanned stack ("layers", with a
  leading layer axis) is split into blocks_<i>.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    names = metrics_lib.path_names(path)
    if names[-1] not in ("kernel", "embedding"):
      continue
    arr = np.asarray(leaf, np.float64)
    stack = ([(f"blocks_{i}", arr[i]) for i in range(arr.shape[0])] if names[0] == "layers"
             else [(names[0], arr)])
    for head, w in stack:
      if names[-1] == "embedding":
        w = w[:vocab_size] if names[-2] == "embed" else w
      elif names[-2] == "out":
        w = w.reshape(-1, w.shape[-1])
      else:
        w = w.reshape(w.shape[0], -1)
      out["/".join([head] + names[1:-1])] = w
  return out


def effective_rank(s) -> float:
  p = s / s.sum()
  p = p[p > 0]
  return float(np.exp(-(p * np.log(p)).sum()))


# The order matrices are listed and drawn in: the model's own, from input to output.
KINDS = ("embed", "pos_embed", "query", "key", "value", "out", "wi", "wi_gate", "wi_up", "wo",
         "lm_head")


def kind(name: str) -> str:
  """The matrix's role: query, key, value, out, wi, wo, ..., embed (the last path part)."""
  return name.split("/")[-1]


def layer_of(name: str):
  m = re.match(r"blocks_(\d+)/", name)
  return int(m.group(1)) if m else None


def _order(name: str):
  k = kind(name)
  layer = layer_of(name)
  return (-1 if layer is None and k != "lm_head" else layer if layer is not None else 1 << 30,
          KINDS.index(k) if k in KINDS else len(KINDS), name)


def study(base, out: str, *, probe_words=PROBE_WORDS, label_tokens: int = 40,
          workdir: str | None = None, command_line: str = "") -> common.Result:
  started = time.time()
  cfg = common.finalize(base)
  model = common.trained_model(cfg, out, workdir)
  tok, v = model.tokenizer, cfg.vocab_size
  # The run's own initialisation (train.Trainer's init draws the same from the seed).
  init_params = model_lib.init_params(model.model_cfg, jax.random.key(cfg.seed))
  trained = weight_matrices(model.params, v)
  trained = {n: trained[n] for n in sorted(trained, key=_order)}
  initial = weight_matrices(init_params, v)

  # Token embeddings: PCA of the real, non-control rows.
  pieces = [tok.id_to_piece(i) for i in range(v)]
  usable = np.array([not (p.startswith("<") and p.endswith(">")) for p in pieces])
  emb = trained["embed"]
  centred = emb[usable] - emb[usable].mean(0)
  u, s, _ = np.linalg.svd(centred, full_matrices=False)
  coords = np.zeros((v, 2))
  coords[usable] = u[:, :2] * s[:2]
  explained = s[:2] ** 2 / (s**2).sum()
  counts = np.bincount(np.asarray(data_lib.build(cfg, model.workdir).train_tokens),
                       minlength=v)[:v]
  frequent = [i for i in np.argsort(-counts) if usable[i]][:label_tokens]

  # Nearest neighbours by cosine similarity.
  unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  neighbour_rows, missing = [], []
  for word in probe_words:
    i = tok.piece_to_id(WORD_START + word)
    if i == tok.unk_id or not usable[i]:
      missing.append(word)
      continue
    sims = unit @ unit[i]
    sims[~usable] = -np.inf
    sims[i] = -np.inf
    best = np.argsort(-sims)[:NEIGHBOURS]
    neighbour_rows.append({"word": readable(pieces[i]), "nearest (cosine)": ", ".join(
        f"{readable(pieces[j])} {sims[j]:.2f}" for j in best)})

  # Singular values, trained against initial.
  rows, spectra = [], {}
  for name, w in trained.items():
    st = np.linalg.svd(w, compute_uv=False)
    si = np.linalg.svd(initial[name], compute_uv=False)
    spectra[name] = (st, si)
    rows.append({"matrix": name, "shape": "x".join(map(str, w.shape)),
                 "sigma_max": float(st[0]), "sigma_max init": float(si[0]),
                 "effective rank": effective_rank(st), "effective rank init": effective_rank(si),
                 "stable rank": float((st**2).sum() / st[0] ** 2),
                 "stable rank init": float((si**2).sum() / si[0] ** 2)})

  fig_pca = _pca_figure(coords, usable, pieces, frequent, explained, cfg)
  fig_sv = _spectra_figure(spectra, cfg)
  sections = ["## Nearest neighbours", "",
              f"Cosine similarity of token embedding rows, the {NEIGHBOURS} nearest of each "
              f"probe word's piece (control and byte pieces left out)"
              + (f"; not a single piece in this vocabulary: {', '.join(missing)}" if missing
                 else "") + ".", "",
              common.markdown_table(["word", "nearest (cosine)"], neighbour_rows), ""]
  intro = (f"The model in {model.workdir} (step {model.step}, d_model {cfg.d_model}, "
           f"{cfg.n_layers} layers, vocabulary {v}) against its own random initialisation "
           f"(Trainer.init_state(seed={cfg.seed}), the exact starting point of the run). One "
           f"row per weight matrix: attention projections flattened to 2-D, the FFN kernels, "
           f"the token embedding (its real {v} rows). Effective rank = exp(entropy of "
           f"sigma_i / sum sigma) (Roy & Vetterli 2007); stable rank = sum sigma_i^2 / "
           f"sigma_max^2.")
  columns = ["matrix", "shape", "sigma_max", "sigma_max init", "effective rank",
             "effective rank init", "stable rank", "stable rank init"]
  return common.write_report(
      out, title="Embeddings and weight matrices", intro=intro, columns=columns, rows=rows,
      figures={"embeddings_pca.png": fig_pca, "singular_values.png": fig_sv},
      captions={"embeddings_pca.png": f"Token embeddings on their first two principal "
                                      f"components, coloured by kind of piece; the "
                                      f"{len(frequent)} most frequent training tokens are "
                                      f"labelled (_ marks a word start).",
                "singular_values.png": "Singular values of each weight matrix, trained (solid, "
                                       "one colour per layer) against the run's random "
                                       "initialisation (dashed grey, the first layer's)."},
      runs=[model.run] if model.run else [], command_line=command_line, sections=sections,
      started=started, extra={"spectra": spectra, "coords": coords, "neighbours": neighbour_rows})


def _pca_figure(coords, usable, pieces, frequent, explained, cfg):
  fig, (ax,) = common.figure(1, panel_size=(8.5, 6.5), title=(
      f"Token embeddings of the trained model (d_model {cfg.d_model}, vocabulary "
      f"{cfg.vocab_size}), PCA"))
  classes = np.array([token_class(p) for p in pieces])
  for i, c in enumerate(CLASSES):
    sel = usable & (classes == c)
    ax.scatter(coords[sel, 0], coords[sel, 1], s=6, alpha=0.45, color=f"C{i}",
               label=f"{c} ({sel.sum()})")
  for i in frequent:
    ax.annotate(readable(pieces[i]), coords[i], fontsize=7, alpha=0.9,
                textcoords="offset points", xytext=(2, 2))
  common.style(ax, "First two principal components", f"PC1 ({explained[0]:.1%} of the variance)",
               f"PC2 ({explained[1]:.1%} of the variance)")
  return fig


def _spectra_figure(spectra, cfg):
  kinds = sorted(dict.fromkeys(kind(n) for n in spectra),
                 key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS))
  fig, axes = common.figure(len(kinds), ncols=min(4, len(kinds)), panel_size=(3.3, 2.7), title=(
      f"Singular values of the weight matrices, trained vs the run's random init "
      f"({cfg.n_layers} layers)"))
  for ax, k in zip(axes, kinds):
    names = [n for n in spectra if kind(n) == k]
    for name in names:
      st = spectra[name][0]
      layer = layer_of(name)
      ax.plot(np.arange(1, len(st) + 1), st, "-", linewidth=1.2,
              color=f"C{layer % 10}" if layer is not None else "C0",
              label=f"layer {layer}" if layer is not None else "trained")
    # The layers' initial spectra are draws of one distribution: the first stands for all.
    si = spectra[names[0]][1]
    ax.plot(np.arange(1, len(si) + 1), si, "--", color="0.4", linewidth=1.2,
            label="random init" + (f" (layer {layer_of(names[0])})" if len(names) > 1 else ""))
    common.style(ax, k, "index i (largest first)", "singular value sigma_i", ylog=True, legend=6)
  return fig


def main(argv):
  del argv
  base = common.study_config(common.MODEL_PRESETS[common.scale()])
  study(base, common.out_dir(), probe_words=_PROBE_WORDS.value or PROBE_WORDS,
        label_tokens=_LABEL_TOKENS.value, workdir=common.workdir_flag(),
        command_line=common.command("embeddings"))


if __name__ == "__main__":
  common.run_main(main)
