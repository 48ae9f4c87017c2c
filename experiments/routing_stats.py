r"""Routing analysis of an MoE checkpoint: per-layer load, drops, entropy, byte-class preferences.

  python experiments/routing_stats.py --workdir=DIR [--out_dir=DIR --num_batches=8 --batch_size=16]
  python experiments/routing_stats.py --workdir=/ckpt/olmoe --task=text_files --path='/data/*.txt'

Runs validation batches through the model restored from DIR (`moe_jax.sample.load_params`) and
reports, for every MoE layer:
  * expert load: fraction of the T*K (token, choice) assignments each expert receives (before
    dropping), the Switch Transformer f_i;
  * drop rate (capacity dispatch only) and mean router entropy, as the layer itself reports them;
  * byte-class preference: for each expert e and byte class c, P(c | routed to e) / P(c), the
    class's share among the assignments expert e receives relative to its share among all tokens
    (1 = no preference, 2 = twice as frequent). A token's class is that of its own input byte: the
    router at position t acts on the hidden state whose most direct input is byte t.
Byte classes: letter, digit, whitespace, punctuation (ASCII), keyword (bytes inside a Python keyword
written as a whole word, a subset of the letters; words cut at a chunk edge count too), and other
(non-ASCII bytes, control bytes, EOS). Writes the tables to stdout and DIR/routing_stats.md and a
heatmap of the preferences to OUT_DIR/routing_heatmap.png.

Models with their own vocabulary (a workdir converted from Hugging Face, `moe_jax.convert`, or
fine-tuned with `data.tokenizer`): the text is tokenised with --tokenizer, else the run's
`data.tokenizer`, else WORKDIR/tokenizer/, and the byte classes do not apply (a token is not a
byte): the report then holds the load, drop rate and router entropy of every expert, and the
heatmap shows the load. --task, --path and --seq_len choose other validation text (a converted
workdir's config names the stdlib task and configs/default.py's sequence length, capped here at the
model's max_len).

How routing is captured: nothing in the library changes. `nnx.capture(model, method_outputs=
nnx.Intermediate)` records the output of every module method during the unchanged forward pass;
from it we take each MoE layer's own aux (load, drop rate, entropy) and its router's logits, from
which `routing.route` (the function the layer calls) recomputes the exact top-k choices per token.
"""
from __future__ import annotations

import dataclasses
import functools
import keyword
import os
import re
import string
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from moe_jax import data, routing  # noqa: E402
from moe_jax.models.transformer import moe_layer_indices  # noqa: E402
from moe_jax.sample import LoadedModel, load_params  # noqa: E402

CLASSES = ("letter", "digit", "whitespace", "punctuation", "keyword", "other")

_KEYWORD_RE = re.compile(
    rb"(?<![A-Za-z0-9_])(?:" + b"|".join(k.encode() for k in sorted(keyword.kwlist, key=len,
                                                                      reverse=True))
    + rb")(?![A-Za-z0-9_])")


def _byte_class_table() -> np.ndarray:
  """bool [VOCAB, C] of the classes decided by the byte alone (keyword is filled per sequence)."""
  table = np.zeros((data.VOCAB_SIZE, len(CLASSES)), bool)
  for byte in range(256):
    row = table[byte + data.NUM_SPECIAL_IDS]
    char = chr(byte)
    row[0] = char in string.ascii_letters
    row[1] = char in string.digits
    row[2] = char in string.whitespace
    row[3] = char in string.punctuation
  table[:, 5] = ~table[:, :4].any(axis=1)
  return table


_CLASS_TABLE = _byte_class_table()


def classify_tokens(tokens: np.ndarray) -> np.ndarray:
  """Byte classes of ByteVocabulary ids [B, S] -> bool [B, S, C] (see CLASSES)."""
  tokens = np.asarray(tokens)
  classes = _CLASS_TABLE[tokens].copy()
  # Special ids become NUL so that they end words.
  as_bytes = np.where(tokens >= data.NUM_SPECIAL_IDS, tokens - data.NUM_SPECIAL_IDS, 0)
  for b, row in enumerate(as_bytes.astype(np.uint8)):
    for match in _KEYWORD_RE.finditer(row.tobytes()):
      classes[b, match.start():match.end(), 4] = True
  return classes


@dataclasses.dataclass
class LayerStats:
  """Routing statistics of one MoE layer, accumulated over the analysed tokens.

  Attributes:
    layer: block index.
    assignments: [E] int, (token, choice) assignments per expert.
    class_counts: [E, C] int, assignments per expert of tokens of each class (None without the
      byte vocabulary).
    load: [E] fraction of assignments per expert (sums to 1).
    dropped_fraction: mean over batches of the layer's reported drop rate.
    router_entropy: mean over batches of the layer's mean router entropy (nats).
  """
  layer: int
  assignments: np.ndarray
  class_counts: np.ndarray | None
  load: np.ndarray
  dropped_fraction: float
  router_entropy: float


@dataclasses.dataclass
class RoutingStats:
  """Per-layer statistics and the class frequencies of the analysed tokens."""
  layers: list[LayerStats]
  class_tokens: np.ndarray | None  # [C] tokens of each class; None without the byte vocabulary
  num_tokens: int
  num_experts: int
  top_k: int
  step: int
  tokenizer: str = ""  # the tokenizer.json of a model with its own vocabulary

  @property
  def byte_classes(self) -> bool:
    """Whether the byte-class statistics exist (the byte vocabulary)."""
    return self.class_tokens is not None

  def preference(self, layer: LayerStats) -> np.ndarray:
    """[E, C] P(class | routed to e) / P(class); NaN for an expert with no assignment."""
    if not self.byte_classes:
      raise ValueError(f"byte classes need the byte vocabulary; these tokens come from "
                       f"{self.tokenizer}: only the expert load, drop rate and entropy apply.")
    with np.errstate(divide="ignore", invalid="ignore"):
      share_in_expert = layer.class_counts / layer.assignments[:, None]
      share_overall = self.class_tokens / self.num_tokens
      return share_in_expert / share_overall[None, :]


# Models of one architecture (seeds of a study) share a graphdef, so one compilation serves them.
@functools.lru_cache(maxsize=4)
def _capture_fn(graphdef, moe_layers: tuple[int, ...]):
  """Jitted (params, tokens) -> (router logits per MoE layer, aux per MoE layer, model aux)."""

  def run(params, tokens):
    model = nnx.merge(graphdef, params)
    (_, model_aux), captured = nnx.capture(model, nnx.Intermediate,
                                           method_outputs=nnx.Intermediate)(tokens)
    captured = nnx.to_pure_dict(captured)
    router_logits, layer_aux = {}, {}
    for i in moe_layers:
      ffn = captured["blocks"][i]["ffn"]
      router_logits[i] = ffn["router"]["__call__"][0]
      layer_aux[i] = ffn["__call__"][0][1]  # MoELayer returns (y, aux)
    return router_logits, layer_aux, model_aux

  return jax.jit(run)


def analysis_data_config(workdir: str, config, *, task: str | None = None,
                         path: str | None = None, seq_len: int | None = None,
                         tokenizer: str | None = None):
  """The data section to analyse `workdir`'s model on: the run's, with the overrides given.

  The tokenizer is `tokenizer`, else the run's `data.tokenizer`, else WORKDIR/tokenizer/ when it
  holds a tokenizer.json (a converted or fine-tuned workdir), else the byte vocabulary. The
  sequence length is capped at the model's max_len.
  """
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  if task:
    data_config.task = task
  if path:
    data_config.path = path
  if seq_len:
    data_config.seq_len = seq_len
  if data_config.seq_len > config.model.max_len:
    data_config.seq_len = config.model.max_len
  local = os.path.join(workdir, "tokenizer")
  data_config.tokenizer = (tokenizer or data_config.get("tokenizer", "")
                           or (local if os.path.isfile(os.path.join(local, "tokenizer.json"))
                               else ""))
  if data_config.get("objective", "lm") != "lm" and data_config.tokenizer:
    data_config.objective = "lm"
  return data_config


def compute_routing_stats(model: LoadedModel, *, num_batches: int | None = None,
                          batch_size: int | None = None, data_config=None) -> RoutingStats:
  """Routes `num_batches` validation batches and accumulates every MoE layer's statistics.

  Args:
    model: from `sample.load_params`.
    num_batches: validation batches (default config.data.eval_batches).
    batch_size: sequences per batch (default config.data.batch_size).
    data_config: the data to route (default the run's `config.data`; `analysis_data_config`).
      With `tokenizer` set the byte-class statistics are left out (None).

  Raises:
    ValueError: the model has no MoE layer, or it has its own vocabulary (fewer ids than the
      byte vocabulary) and no tokenizer is given.
  """
  config = model.config
  data_config = config.data if data_config is None else data_config
  tokenizer = data_config.get("tokenizer", "") or ""
  if not tokenizer and config.model.vocab_size < data.VOCAB_SIZE:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is not the byte vocabulary "
                     f"({data.VOCAB_SIZE} ids): give its tokenizer (--tokenizer=PATH; a converted "
                     "workdir keeps it in WORKDIR/tokenizer/).")
  moe_config = config.model.moe
  if (moe_config.get("router", "token_choice") != "token_choice"
      or moe_config.get("bias_update_rate", 0) or routing.num_extra_experts(moe_config)):
    # The analysis recomputes top-k choices from the captured logits, which needs stateless
    # token choice over FFN experts only.
    raise ValueError("routing_stats analyses token-choice routing without a selection bias or "
                     f"zero-computation/null experts; this run uses router={moe_config.router!r}.")
  moe_layers = list(moe_layer_indices(config.model))
  if not moe_layers:
    raise ValueError(f"config.model.moe_every={config.model.moe_every} (moe_layers="
                     f"{config.model.get('moe_layers')}): the model has no MoE layer to analyse.")
  num_batches = num_batches or data_config.eval_batches
  batch_size = batch_size or data_config.batch_size
  byte_classes = not tokenizer
  num_experts, top_k = moe_config.num_experts, moe_config.top_k
  run = _capture_fn(model.graphdef, tuple(moe_layers))

  assignments = {i: np.zeros(num_experts, np.int64) for i in moe_layers}
  class_counts = {i: np.zeros((num_experts, len(CLASSES)), np.int64) for i in moe_layers}
  dropped = {i: [] for i in moe_layers}
  entropy = {i: [] for i in moe_layers}
  class_tokens = np.zeros(len(CLASSES), np.int64)
  num_tokens = 0
  dataset = data.load_dataset(data_config, "validation")
  for batch in dataset.eval_batches(batch_size, num_batches):
    tokens = batch["inputs"]
    if byte_classes:
      classes = classify_tokens(tokens).reshape(-1, len(CLASSES))
      class_tokens += classes.sum(axis=0)
    num_tokens += tokens.size
    router_logits, layer_aux, model_aux = jax.device_get(run(model.params, jnp.asarray(tokens)))
    for i in moe_layers:
      decision = routing.route(moe_config, jnp.asarray(router_logits[i]),
                               jnp.ones((tokens.size,), bool))
      expert_index = np.asarray(decision.expert_index)  # [T, K]
      one_hot = np.zeros((expert_index.shape[0], num_experts), np.int64)
      for k in range(top_k):
        np.add.at(one_hot, (np.arange(expert_index.shape[0]), expert_index[:, k]), 1)
      assignments[i] += one_hot.sum(axis=0)
      if byte_classes:
        class_counts[i] += one_hot.T @ classes.astype(np.int64)
      # The recomputed choices must be the layer's own: its reported load is their histogram.
      np.testing.assert_allclose(one_hot.sum(axis=0) / expert_index.size,
                                 model_aux[f"layer{i}/expert_load"], atol=1e-6,
                                 err_msg=f"layer {i}: recomputed routing differs from the model's")
      dropped[i].append(float(layer_aux[i]["dropped_fraction"]))
      entropy[i].append(float(layer_aux[i]["router_entropy"]))
  layers = [LayerStats(layer=i, assignments=assignments[i],
                       class_counts=class_counts[i] if byte_classes else None,
                       load=assignments[i] / assignments[i].sum(),
                       dropped_fraction=float(np.mean(dropped[i])),
                       router_entropy=float(np.mean(entropy[i]))) for i in moe_layers]
  return RoutingStats(layers=layers, class_tokens=class_tokens if byte_classes else None,
                      num_tokens=num_tokens, num_experts=num_experts, top_k=top_k,
                      step=model.step,
                      tokenizer=data.tokenizer_file(tokenizer) if tokenizer else "")


def to_markdown(stats: RoutingStats, title: str) -> str:
  """Markdown: class frequencies, then per layer a table of load and class preference per expert
  (load alone without the byte vocabulary)."""
  if not stats.byte_classes:
    return _load_markdown(stats, title)
  lines = [f"# Routing statistics: {title} (step {stats.step})", "",
           f"{stats.num_tokens:,} validation tokens, {stats.num_experts} experts, top-"
           f"{stats.top_k}. Cells: P(class | expert) / P(class) (1 = no preference).", "",
           "Class frequency over the tokens: " + ", ".join(
               f"{name} {count / stats.num_tokens:.1%}"
               for name, count in zip(CLASSES, stats.class_tokens)) + ".", ""]
  for layer in stats.layers:
    pref = stats.preference(layer)
    lines += [f"## Layer {layer.layer}", "",
              f"Drop rate {layer.dropped_fraction:.2%}; router entropy {layer.router_entropy:.3f} "
              f"nats (uniform: {np.log(stats.num_experts):.3f}).", "",
              "| expert | load | " + " | ".join(CLASSES) + " |",
              "|---|---|" + "---|" * len(CLASSES)]
    for e in range(stats.num_experts):
      cells = " | ".join("-" if np.isnan(v) else f"{v:.2f}" for v in pref[e])
      lines.append(f"| {e} | {layer.load[e]:.3f} | {cells} |")
    lines.append("")
  return "\n".join(lines)


def _load_markdown(stats: RoutingStats, title: str) -> str:
  """Per layer: drop rate, entropy and every expert's load (a model with its own vocabulary)."""
  lines = [f"# Routing statistics: {title} (step {stats.step})", "",
           f"{stats.num_tokens:,} validation tokens ({stats.tokenizer}), {stats.num_experts} "
           f"experts, top-{stats.top_k}. Byte classes need the byte vocabulary, so only the "
           f"expert load is reported (uniform: {1 / stats.num_experts:.3f}).", "",
           "| layer | drop rate | router entropy (nats) | max load | min load | "
           + " | ".join(f"e{e}" for e in range(stats.num_experts)) + " |",
           "|---|---|---|---|---|" + "---|" * stats.num_experts]
  for layer in stats.layers:
    lines.append(f"| {layer.layer} | {layer.dropped_fraction:.2%} | {layer.router_entropy:.3f} | "
                 f"{layer.load.max():.3f} | {layer.load.min():.3f} | "
                 + " | ".join(f"{v:.3f}" for v in layer.load) + " |")
  lines.append("")
  return "\n".join(lines)


def plot_heatmap(stats: RoutingStats, path: str) -> None:
  """One panel per MoE layer: log2 preference [E, C], annotated with the ratio; without the byte
  vocabulary one panel of the load of every (layer, expert)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if not stats.byte_classes:
    load = np.stack([layer.load for layer in stats.layers])  # [L, E]
    fig, ax = plt.subplots(figsize=(0.5 * stats.num_experts + 2, 0.4 * len(stats.layers) + 2))
    image = ax.imshow(load * stats.num_experts, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(stats.layers)), [f"layer {l.layer}" for l in stats.layers])
    fig.colorbar(image, ax=ax, label="load x num_experts (1 = uniform)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return

  num = len(stats.layers)
  fig, axes = plt.subplots(1, num, figsize=(1.2 * len(CLASSES) * num + 1.5,
                                            0.45 * stats.num_experts + 2), squeeze=False)
  image = None
  for ax, layer in zip(axes[0], stats.layers):
    pref = stats.preference(layer)
    with np.errstate(divide="ignore"):
      image = ax.imshow(np.log2(pref), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
    for e in range(stats.num_experts):
      for c in range(len(CLASSES)):
        if np.isfinite(pref[e, c]):
          ax.text(c, e, f"{pref[e, c]:.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(stats.num_experts),
                  [f"e{e} ({load:.0%})" for e, load in enumerate(layer.load)])
    ax.set_title(f"layer {layer.layer}: drop {layer.dropped_fraction:.1%}, "
                 f"H {layer.router_entropy:.2f} nats", fontsize=9)
  fig.colorbar(image, ax=axes[0].tolist(), label="log2 P(class | expert) / P(class)")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
  flags.DEFINE_string("out_dir", None, "Where the heatmap PNG goes (default: --workdir).")
  flags.DEFINE_integer("num_batches", None,
                       "Validation batches (default config.data.eval_batches).")
  flags.DEFINE_integer("batch_size", None, "Sequences per batch (default config.data.batch_size).")
  flags.DEFINE_string("task", None, "Data task to route (default the run's config.data.task).")
  flags.DEFINE_string("path", None, "Glob of text files for --task=text_files.")
  flags.DEFINE_integer("seq_len", None, "Tokens per sequence (default the run's, <= max_len).")
  flags.DEFINE_string("tokenizer", None, "tokenizer.json (or its directory) of a model with its "
                      "own vocabulary (default the run's data.tokenizer, else WORKDIR/tokenizer/).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    model = load_params(f.workdir)
    data_config = analysis_data_config(f.workdir, model.config, task=f.task, path=f.path,
                                       seq_len=f.seq_len, tokenizer=f.tokenizer)
    stats = compute_routing_stats(model, num_batches=f.num_batches, batch_size=f.batch_size,
                                  data_config=data_config)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  text = to_markdown(stats, f.workdir)
  print(text)
  with open(os.path.join(f.workdir, "routing_stats.md"), "w") as out:
    out.write(text)
  out_dir = f.out_dir or f.workdir
  os.makedirs(out_dir, exist_ok=True)
  plot_heatmap(stats, os.path.join(out_dir, "routing_heatmap.png"))
  print(f"Wrote {os.path.join(f.workdir, 'routing_stats.md')} and "
        f"{os.path.join(out_dir, 'routing_heatmap.png')}.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
