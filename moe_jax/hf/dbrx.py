"""DBRX (Databricks 2024, "Introducing DBRX"): every layer MoE, softmax over all experts, top-k,
weights divided by their `moe_normalize_expert_weights`-norm (p = 1: renormalised; None: raw);
bias-free LayerNorms (eps 1e-5, torch's default); one fused Wqkv projection whose output is
clamped to +-`clip_qkv` before the q/k/v split and RoPE; GQA; experts stored flat, w1 (gate), v1
(up) and w2 (down) each [E F, D].

The hub config nests attention and FFN fields (`attn_config`, `ffn_config`) under DBRX's own names
(d_model, n_heads, ...); `flatten` maps it onto the standard names the shared reader expects, and
`write` nests them back. `moe_jitter_eps` is a training-time input jitter that transformers
applies only in training mode; the imported model computes DBRX's inference function.
"""
from moe_jax.hf.common import Family, require
from moe_jax.hf.errors import UnsupportedConfigError
from moe_jax.hf.tensors import HubNames

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default; DBRX's config has no eps field
_FLAT = {"d_model": "hidden_size", "n_heads": "num_attention_heads",
         "n_layers": "num_hidden_layers", "max_seq_len": "max_position_embeddings"}


def flatten(hub: dict) -> dict:
  """DBRX's nested config as the standard flat field names (a new dict)."""
  flat = {k: v for k, v in hub.items() if k not in ("attn_config", "ffn_config")}
  for ours, standard in _FLAT.items():
    if ours in hub:
      flat[standard] = hub[ours]
  attn, ffn = hub.get("attn_config") or {}, hub.get("ffn_config") or {}
  flat["num_key_value_heads"] = attn.get("kv_n_heads", 1)
  flat["clip_qkv"] = attn.get("clip_qkv")
  if "rope_parameters" not in hub and "rope_theta" in attn:
    flat["rope_theta"] = attn["rope_theta"]
  flat["hidden_act"] = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
  flat["intermediate_size"] = ffn.get("ffn_hidden_size", 3584)
  flat["num_local_experts"] = ffn.get("moe_num_experts", 4)
  flat["num_experts_per_tok"] = ffn.get("moe_top_k", 1)
  flat["moe_normalize_expert_weights"] = ffn.get("moe_normalize_expert_weights", 1.0)
  flat["router_aux_loss_coef"] = ffn.get("moe_loss_weight", 0.01)
  flat["rms_norm_eps"] = LAYER_NORM_EPS
  return flat


def read(hub: dict, model) -> None:
  require(hub, "moe_normalize_expert_weights", "1 (renormalised top-k) or None (raw softmax)",
          lambda v: v in (None, 1, 1.0))
  model.norm = "layer"
  model.norm_eps = LAYER_NORM_EPS
  model.moe_every, model.moe_layers = 1, None
  model.clip_qkv = None if hub.get("clip_qkv") is None else float(hub["clip_qkv"])
  moe = model.moe
  moe.num_experts = hub["num_local_experts"]
  moe.top_k = hub["num_experts_per_tok"]
  moe.expert_hidden_dim = hub["intermediate_size"]
  moe.normalize_top_k = hub["moe_normalize_expert_weights"] is not None
  if moe.normalize_top_k and moe.top_k == 1:
    raise UnsupportedConfigError("'dbrx' moe_top_k=1 with moe_normalize_expert_weights=1 (weight "
                                 "1) is not supported: moe_jax keeps the raw probability for k=1.")


def write(model, hub: dict) -> None:
  if abs(model.norm_eps - LAYER_NORM_EPS) > 1e-12:
    raise UnsupportedConfigError(f"'dbrx' cannot express model.norm_eps={model.norm_eps} (its "
                                 f"LayerNorms use {LAYER_NORM_EPS}).")
  attn = dict(hub.get("attn_config") or {})
  ffn = dict(hub.get("ffn_config") or {})
  for ours, standard in _FLAT.items():
    hub[ours] = hub.pop(standard)
  attn.update(kv_n_heads=hub.pop("num_key_value_heads"), clip_qkv=model.get("clip_qkv"),
              rope_theta=float(model.rope_base))  # transformers reads attn_config.rope_theta
  ffn.update(ffn_act_fn={"name": hub.pop("hidden_act")}, ffn_hidden_size=model.moe.expert_hidden_dim,
             moe_num_experts=model.moe.num_experts, moe_top_k=model.moe.top_k,
             moe_normalize_expert_weights=1.0 if model.moe.normalize_top_k else None,
             moe_loss_weight=model.moe.load_balance_loss_weight)
  for name in ("intermediate_size", "rms_norm_eps", "head_dim"):
    hub.pop(name, None)
  hub.update(attn_config=attn, ffn_config=ffn)


FAMILY = Family("dbrx", "DbrxForCausalLM",
                HubNames(layer="transformer.blocks.{i}.", attn_norm="norm_attn_norm.norm_1.weight",
                         ffn_norm="norm_attn_norm.norm_2.weight", attention="norm_attn_norm.attn.",
                         fused_qkv="Wqkv.weight", out_proj="out_proj",
                         router="ffn.router.layer.weight", flat_experts="ffn.experts.mlp.",
                         embed="transformer.wte.weight", final_norm="transformer.norm_f.weight"),
                read, write, rope_theta=1e4, flatten=flatten)
