"""How each of our parameters is made from hub tensors and back: `TensorSpec`s, built once per layout.

Our parameters (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`) keep the contraction's input axes
first: attention w_q [D, H, Dh], w_o [H, Dh, D], MLP w_up [D, F], experts w_gate_up [E, D, 2F]
(gate and up interleaved, `experts.fuse_gate_up`) and w_down [E, F, D], router [D, E], unembed
[D, V]. Hub `Linear` weights are [out, in], experts one tensor per expert and projection.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

Path = tuple  # keys into the pure parameter dict, e.g. ("blocks", 0, "attn", "w_q")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One parameter: its path, the hub tensors it is made of, and the two conversions.

  With `extra_paths` (one hub tensor holding several of our parameters, e.g. DBRX's fused Wqkv),
  `to_ours` returns a list, one array per path of `paths`, and `to_hub` takes that list.
  """
  path: Path
  sources: tuple[str, ...]  # hub tensor names
  hub_shapes: tuple[tuple[int, ...], ...]  # their expected shapes
  to_ours: Callable[[list[np.ndarray]], np.ndarray]
  to_hub: Callable[[np.ndarray], list[np.ndarray]]
  collection: str = "params"  # or "router_state" (DeepSeek-V3's e_score_correction_bias)
  extra_paths: tuple[Path, ...] = ()

  @property
  def paths(self) -> tuple[Path, ...]:
    return (self.path,) + self.extra_paths

  def ours(self, hub_tensors: list[np.ndarray]) -> list[np.ndarray]:
    """Our arrays, one per path of `paths`."""
    value = self.to_ours(hub_tensors)
    return list(value) if self.extra_paths else [value]

  def hub(self, ours: list[np.ndarray]) -> list[np.ndarray]:
    """The hub tensors, one per source, from our arrays (one per path of `paths`)."""
    return self.to_hub(ours if self.extra_paths else ours[0])


def linear(path: Path, name: str, shape: Sequence[int], num_in: int) -> TensorSpec:
  """A hub Linear weight [out, in] as our [*in_dims, *out_dims] (`num_in` input dims)."""
  shape = tuple(shape)
  fan_in, fan_out = math.prod(shape[:num_in]), math.prod(shape[num_in:])
  return TensorSpec(path, (name,), ((fan_out, fan_in),),
                    lambda w: w[0].T.reshape(shape),
                    lambda a: [a.reshape(fan_in, fan_out).T])


def same(path: Path, name: str, shape: Sequence[int]) -> TensorSpec:
  """A flat hub vector holding our values in the same order (norm scales, biases)."""
  shape = tuple(shape)
  return TensorSpec(path, (name,), ((math.prod(shape),),), lambda w: w[0].reshape(shape),
                    lambda a: [a.reshape(-1)])


def identity(path: Path, name: str, shape: Sequence[int]) -> TensorSpec:
  """A hub tensor of exactly our shape and layout."""
  return TensorSpec(path, (name,), (tuple(shape),), lambda w: w[0], lambda a: [a])


def fused_qkv(paths: Sequence[Path], name: str, d_model: int, heads: int, kv_heads: int,
              head_dim: int) -> TensorSpec:
  """One hub Linear [(H + 2 H_kv) Dh, D] of q, then k, then v rows (DBRX's Wqkv) as our w_q
  [D, H, Dh], w_k and w_v [D, H_kv, Dh]."""
  sizes = (heads, kv_heads, kv_heads)
  rows = [n * head_dim for n in sizes]

  def to_ours(ws):
    parts = np.split(ws[0], np.cumsum(rows)[:-1], axis=0)
    return [p.T.reshape(d_model, n, head_dim) for p, n in zip(parts, sizes)]

  def to_hub(arrays):
    return [np.concatenate([a.reshape(d_model, -1).T for a in arrays], axis=0)]

  return TensorSpec(tuple(paths[0]), (name,), ((sum(rows), d_model),), to_ours, to_hub,
                    extra_paths=tuple(tuple(p) for p in paths[1:]))


def flat_experts(path: Path, name: str, shape: Sequence[int], transpose: bool) -> TensorSpec:
  """One hub tensor [E F, D] of all experts (DBRX's w1, v1, w2) as our [E, D, F] (`transpose`,
  the gate and up weights) or [E, F, D] (the down weight, stored as used)."""
  num = shape[0]
  hidden = shape[2] if transpose else shape[1]
  d_model = shape[1] if transpose else shape[2]

  def to_ours(ws):
    w = ws[0].reshape(num, hidden, d_model)
    return w.transpose(0, 2, 1) if transpose else w

  def to_hub(a):
    return [(a.transpose(0, 2, 1) if transpose else a).reshape(num * hidden, d_model)]

  return TensorSpec(path, (name,), ((num * hidden, d_model),), to_ours, to_hub)


def flat_gate_up(path: Path, gate: str, up: str, shape: Sequence[int]) -> TensorSpec:
  """DBRX's w1 (gate) and v1 (up), each [E F, D], as our interleaved w_gate_up [E, D, 2F]."""
  num, d_model, twice_hidden = shape
  hidden = twice_hidden // 2
  one = flat_experts(path, gate, (num, d_model, hidden), transpose=True)

  def to_ours(ws):
    return _interleave(one.to_ours([ws[0]]), one.to_ours([ws[1]]))

  def to_hub(a):
    gate_w, up_w = _deinterleave(a)
    return one.to_hub(gate_w) + one.to_hub(up_w)

  return TensorSpec(path, (gate, up), one.hub_shapes * 2, to_ours, to_hub)


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
  """gate, up [..., F] as our w_gate_up [..., 2F] (`experts.fuse_gate_up`, in NumPy on the host)."""
  return np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])


def _deinterleave(gate_up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The inverse of `_interleave`: (gate, up) [..., F]."""
  pairs = gate_up.reshape(*gate_up.shape[:-1], gate_up.shape[-1] // 2, 2)
  return pairs[..., 0], pairs[..., 1]


def stacked_linear(path: Path, names: Sequence[str], shape: Sequence[int]) -> TensorSpec:
  """Per-expert hub Linear weights [out, in] as our [E, in, out]."""
  num, fan_in, fan_out = shape
  return TensorSpec(path, tuple(names), ((fan_out, fan_in),) * num,
                    lambda ws: np.stack([w.T for w in ws]),
                    lambda a: [a[e].T for e in range(num)])


def stacked_gate_up(path: Path, gate_names: Sequence[str], up_names: Sequence[str],
                    shape: Sequence[int]) -> TensorSpec:
  """Per-expert hub gate and up weights [F, D] as our interleaved w_gate_up [E, D, 2F]."""
  num, d_model, twice_hidden = shape
  hidden = twice_hidden // 2

  def to_ours(ws):
    return _interleave(np.stack([w.T for w in ws[:num]]), np.stack([w.T for w in ws[num:]]))

  def to_hub(a):
    gate, up = _deinterleave(a)
    return [gate[e].T for e in range(num)] + [up[e].T for e in range(num)]

  return TensorSpec(path, tuple(gate_names) + tuple(up_names), ((hidden, d_model),) * 2 * num,
                    to_ours, to_hub)


def concatenated_gate_up(path: Path, name: str, shape: Sequence[int]) -> TensorSpec:
  """One hub tensor [E, 2F, D] of all experts' gate rows then up rows (Granite's input_linear) as
  our interleaved w_gate_up [E, D, 2F]."""
  num, d_model, twice_hidden = shape
  hidden = twice_hidden // 2

  def to_ours(ws):
    return _interleave(ws[0][:, :hidden].transpose(0, 2, 1), ws[0][:, hidden:].transpose(0, 2, 1))

  def to_hub(a):
    return [np.concatenate(_deinterleave(a), axis=-1).transpose(0, 2, 1)]

  return TensorSpec(path, (name,), ((num, twice_hidden, d_model),), to_ours, to_hub)


def stacked_transposed(path: Path, name: str, shape: Sequence[int]) -> TensorSpec:
  """One hub tensor [E, out, in] of all experts' Linear weights as our [E, in, out]."""
  num, fan_in, fan_out = shape
  return TensorSpec(path, (name,), ((num, fan_out, fan_in),),
                    lambda ws: ws[0].transpose(0, 2, 1), lambda a: [a.transpose(0, 2, 1)])


@dataclasses.dataclass(frozen=True)
class HubNames:
  """The hub names of one family's decoder layer (Llama's by default), `{i}` = layer, `{e}` = expert."""
  layer: str = "model.layers.{i}."
  attn_norm: str = "input_layernorm.weight"
  ffn_norm: str = "post_attention_layernorm.weight"
  attention: str = "self_attn."
  mlp: str = "mlp."  # a dense layer's gate_proj / up_proj / down_proj
  router: str = "mlp.gate.weight"
  expert: str = "mlp.experts.{e}."
  expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
  shared_expert: str = "mlp.shared_expert."
  shared_expert_gate: str = "mlp.shared_expert_gate.weight"
  selection_bias: str = "mlp.gate.e_score_correction_bias"
  router_bias: str = "mlp.gate.bias"
  # Fused experts (GPT-OSS): one [E, D, 2F] gate_up tensor (gate/up interleaved, our layout), one
  # [E, F, D] down tensor, and their biases, under this prefix; "" = per-expert tensors.
  fused_experts: str = ""
  # Concatenated experts (Granite-MoE): input_linear [E, 2F, D] (gate rows, then up rows) and
  # output_linear [E, D, F] under this prefix.
  concatenated_experts: str = ""
  # Flat experts (DBRX): w1 (gate), v1 (up), w2 (down), each [E F, D], under this prefix.
  flat_experts: str = ""
  # DBRX's one Wqkv weight under the attention prefix instead of q/k/v_proj; "" = separate.
  fused_qkv: str = ""
  out_proj: str = "o_proj"
  embed: str = "model.embed_tokens.weight"
  final_norm: str = "model.norm.weight"


def layer_specs(model, layer: int, is_moe: bool, names: HubNames) -> list[TensorSpec]:
  """The specs of decoder layer `layer` of `config.model` `model`."""
  d, h, dh = model.d_model, model.num_heads, model.head_dim
  kv = model.get("num_kv_heads", 0) or h
  pre = names.layer.format(i=layer)
  at = pre + names.attention
  block = ("blocks", layer)
  specs = [same(block + ("attn_norm", "scale"), pre + names.attn_norm, (d,)),
           same(block + ("ffn_norm", "scale"), pre + names.ffn_norm, (d,))]
  if model.get("attention", "mha") == "mla":
    specs += mla_specs(model, block + ("attn",), at)
    return specs + ffn_specs(model, block, pre, is_moe, names)
  if names.fused_qkv:
    specs.append(fused_qkv([block + ("attn", w) for w in ("w_q", "w_k", "w_v")],
                           at + names.fused_qkv, d, h, kv, dh))
  else:
    specs += [linear(block + ("attn", "w_q"), at + "q_proj.weight", (d, h, dh), 1),
              linear(block + ("attn", "w_k"), at + "k_proj.weight", (d, kv, dh), 1),
              linear(block + ("attn", "w_v"), at + "v_proj.weight", (d, kv, dh), 1)]
  specs.append(linear(block + ("attn", "w_o"), at + names.out_proj + ".weight", (h, dh, d), 2))
  if model.get("attention_bias", False):
    specs += [same(block + ("attn", "b_q"), at + "q_proj.bias", (h, dh)),
              same(block + ("attn", "b_k"), at + "k_proj.bias", (kv, dh)),
              same(block + ("attn", "b_v"), at + "v_proj.bias", (kv, dh))]
  if model.get("attention_out_bias", False):
    specs.append(same(block + ("attn", "b_o"), at + "o_proj.bias", (d,)))
  if model.get("attention_sinks", False):
    specs.append(same(block + ("attn", "sinks"), at + "sinks", (h,)))
  qk_norm = model.get("qk_norm", "none")
  if qk_norm != "none":
    q_dim, k_dim = (dh, dh) if qk_norm == "head" else (h * dh, kv * dh)
    specs += [same(block + ("attn", "q_norm", "scale"), at + "q_norm.weight", (q_dim,)),
              same(block + ("attn", "k_norm", "scale"), at + "k_norm.weight", (k_dim,))]
  return specs + ffn_specs(model, block, pre, is_moe, names)


def mla_specs(model, path: Path, prefix: str) -> list[TensorSpec]:
  """DeepSeek's MLA projections (`models/mla.py`) under hub prefix `...self_attn.`."""
  d, h, mla = model.d_model, model.num_heads, model.mla
  qk, r, dr = mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.kv_lora_rank, mla.qk_rope_head_dim
  bias = model.get("attention_bias", False)
  specs = []
  if mla.q_lora_rank:
    rq = mla.q_lora_rank
    specs += [linear(path + ("w_q_a",), prefix + "q_a_proj.weight", (d, rq), 1),
              same(path + ("q_a_norm", "scale"), prefix + "q_a_layernorm.weight", (rq,)),
              linear(path + ("w_q_b",), prefix + "q_b_proj.weight", (rq, h, qk), 1)]
    if bias:
      specs.append(same(path + ("b_q_a",), prefix + "q_a_proj.bias", (rq,)))
  else:
    specs.append(linear(path + ("w_q",), prefix + "q_proj.weight", (d, h, qk), 1))
  specs += [
      linear(path + ("w_kv_a",), prefix + "kv_a_proj_with_mqa.weight", (d, r + dr), 1),
      same(path + ("kv_a_norm", "scale"), prefix + "kv_a_layernorm.weight", (r,)),
      linear(path + ("w_kv_b",), prefix + "kv_b_proj.weight",
             (r, h, mla.qk_nope_head_dim + mla.v_head_dim), 1),
      linear(path + ("w_o",), prefix + "o_proj.weight", (h, mla.v_head_dim, d), 2)]
  if bias:
    specs += [same(path + ("b_kv_a",), prefix + "kv_a_proj_with_mqa.bias", (r + dr,)),
              same(path + ("b_o",), prefix + "o_proj.bias", (d,))]
  return specs


def ffn_specs(model, block: Path, pre: str, is_moe: bool, names: HubNames) -> list[TensorSpec]:
  """A layer's FFN: the dense MLP, or the router, experts and shared experts of an MoE layer."""
  d = model.d_model
  specs = []
  ffn = block + ("ffn",)
  if not is_moe:
    return specs + mlp_specs(ffn, pre + names.mlp, d, model.mlp_dim)
  moe = model.moe
  e, f = moe.num_experts, moe.expert_hidden_dim
  gate_p, up_p, down_p = names.expert_projections
  expert = lambda proj: [pre + names.expert.format(e=j) + proj + ".weight" for j in range(e)]
  specs.append(linear(ffn + ("router", "kernel"), pre + names.router, (d, e), 1))
  if moe.get("router_bias", False):
    specs.append(same(ffn + ("router", "bias"), pre + names.router_bias, (e,)))
  if moe.get("selection_bias", False):
    bias = same(ffn + ("selection_bias",), pre + names.selection_bias, (e,))
    specs.append(dataclasses.replace(bias, collection="router_state"))
  if names.fused_experts:
    fused = pre + names.fused_experts
    specs += [identity(ffn + ("experts", "w_gate_up"), fused + "gate_up_proj", (e, d, 2 * f)),
              identity(ffn + ("experts", "w_down"), fused + "down_proj", (e, f, d))]
    if moe.get("expert_bias", False):
      specs += [identity(ffn + ("experts", "b_in"), fused + "gate_up_proj_bias", (e, 2 * f)),
                identity(ffn + ("experts", "b_down"), fused + "down_proj_bias", (e, d))]
  elif names.flat_experts:
    prefix = pre + names.flat_experts
    specs += [flat_gate_up(ffn + ("experts", "w_gate_up"), prefix + "w1", prefix + "v1",
                           (e, d, 2 * f)),
              flat_experts(ffn + ("experts", "w_down"), prefix + "w2", (e, f, d), transpose=False)]
  elif names.concatenated_experts:
    prefix = pre + names.concatenated_experts
    specs += [concatenated_gate_up(ffn + ("experts", "w_gate_up"), prefix + "input_linear.weight",
                                   (e, d, 2 * f)),
              stacked_transposed(ffn + ("experts", "w_down"), prefix + "output_linear.weight",
                                 (e, f, d))]
  else:
    specs += [stacked_gate_up(ffn + ("experts", "w_gate_up"), expert(gate_p), expert(up_p),
                              (e, d, 2 * f)),
              stacked_linear(ffn + ("experts", "w_down"), expert(down_p), (e, f, d))]
  if moe.get("num_shared_experts", 0):
    shared = moe.get("shared_expert_hidden_dim", 0) or moe.num_shared_experts * f
    specs += mlp_specs(ffn + ("shared_experts",), pre + names.shared_expert, d, shared)
    if moe.get("shared_expert_gate", False):
      specs.append(linear(ffn + ("shared_expert_gate",), pre + names.shared_expert_gate, (d, 1), 1))
  return specs


def mlp_specs(path: Path, prefix: str, d_model: int, hidden: int) -> list[TensorSpec]:
  """A SwiGLU MLP: gate_proj, up_proj [F, D] and down_proj [D, F] as w_gate, w_up, w_down."""
  return [linear(path + ("w_gate",), prefix + "gate_proj.weight", (d_model, hidden), 1),
          linear(path + ("w_up",), prefix + "up_proj.weight", (d_model, hidden), 1),
          linear(path + ("w_down",), prefix + "down_proj.weight", (hidden, d_model), 1)]


def model_specs(model, moe_layers: Sequence[int], names: HubNames) -> list[TensorSpec]:
  """Every parameter of `config.model` `model` (embedding, layers, final norm, output)."""
  specs = [identity(("embed", "embedding"), names.embed, (model.vocab_size, model.d_model))]
  for i in range(model.num_layers):
    specs += layer_specs(model, i, i in moe_layers, names)
  specs.append(same(("final_norm", "scale"), names.final_norm, (model.d_model,)))
  if not model.tie_embeddings:
    specs.append(linear(("unembed",), "lm_head.weight", (model.d_model, model.vocab_size), 1))
  return specs
