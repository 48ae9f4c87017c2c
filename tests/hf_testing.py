"""Tiny random Hugging Face checkpoints and transformers reference logits for the `moe_jax.hf` tests.

Each family's model is built from a config (no download), with every RMSNorm and LayerNorm weight drawn from
1 + 0.3 N(0, 1), every bias (DeepSeek-V3's e_score_correction_bias included) from 0.1 N(0, 1) and
GPT-OSS's sinks from N(0, 1) so that a norm or bias the importer drops or
misplaces moves the logits, and saved with `save_pretrained` (safetensors, hub layout). The
config detail that is easy to get wrong in each family is made large enough to matter, and
`build_tiny` asserts that it does (OLMoE's `clip_qkv` clamps a real fraction of q, k and v; Llama's
llama3 RoPE scaling and Qwen3-MoE's large `rms_norm_eps` change the logits).

Reference logits come from transformers itself, loaded back from disk with eager attention, eager
experts and float32, and the loading info is checked to be clean (transformers fills a missing
tensor with random weights and only warns).
"""
import copy
import json
import os

import numpy as np
import torch
import transformers
from safetensors import safe_open

torch.set_num_threads(1)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama",
            "qwen3", "deepseek_v2", "granitemoe", "dbrx"]
MOE_FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss",
                "deepseek_v2", "granitemoe", "dbrx"]

VOCAB = 97  # awkward on purpose: divides by nothing a mesh axis has
BATCH = 2
SEQ = 13
MAX_POSITIONS = 64

# Common to all families: vocab, positions, and an init wide enough that the logits are O(1).
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, initializer_range=0.1,
               num_attention_heads=4, num_key_value_heads=2)

# transformers config class, config fields (beyond _COMMON).
_FAMILY_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        hidden_size=48, head_dim=16,  # 48 / 4 heads = 12 != 16
        intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[],
        rms_norm_eps=1e-2)),  # the family whose eps is varied: ~ mean(x^2) of the embeddings
    "olmoe": ("OlmoeConfig", dict(
        hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        clip_qkv=0.8)),  # q and k are RMS-normalised (|q| ~ 1), so 0.8 clamps a real fraction
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=48,  # not a multiple of moe_intermediate_size
        num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[1],  # layer 1 is dense
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),  # qkv_bias: default True
    "deepseek_v3": ("DeepseekV3Config", dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        num_key_value_heads=4, rope_interleave=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0,
                             beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                             original_max_position_embeddings=16))),
    "gpt_oss": ("GptOssConfig", dict(
        hidden_size=32, head_dim=16, intermediate_size=32, num_hidden_layers=2,
        num_local_experts=8, num_experts_per_tok=2,
        sliding_window=4,  # layer 0 sliding (default alternation), layer 1 full; 13 tokens
        swiglu_limit=0.3,  # small enough that the clamps bite at this init
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                             beta_slow=1.0, truncate=False,
                             original_max_position_embeddings=16))),
    "deepseek_v2": ("DeepseekV2Config", dict(  # V2-Lite's shape: no query compression
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", n_shared_experts=2,
        routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, num_key_value_heads=4,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0,
                             beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
                             original_max_position_embeddings=16))),
    "granitemoe": ("GraniteMoeConfig", dict(
        hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_local_experts=8,
        num_experts_per_tok=2, attention_bias=True,
        # muP-style scales, each far enough from 1 (from head_dim^-0.5 = 0.35) to matter.
        embedding_multiplier=4.0, residual_multiplier=0.6, attention_multiplier=0.8,
        logits_scaling=1.5)),
    "dbrx": ("DbrxConfig", dict(  # nested configs under DBRX's own names
        d_model=32, n_heads=4, n_layers=2, max_seq_len=MAX_POSITIONS,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0,
                         clip_qkv=0.5),  # un-normalised q/k/v: std ~0.6 here, so it bites
        ffn_config=dict(ffn_hidden_size=24, moe_num_experts=8, moe_top_k=2))),
    "llama": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    "qwen3": ("Qwen3Config", dict(
        hidden_size=32, head_dim=16,  # 32 / 4 heads = 8 != 16
        intermediate_size=64, num_hidden_layers=2, tie_word_embeddings=True)),
}

# Per family, config overrides that undo its tricky detail; `build_tiny` asserts that each changes
# the logits of the built model, so that a parity test passing means the detail is implemented.
DETAIL_OFF = {
    "olmoe": dict(clip_qkv=None),
    "llama": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "qwen3_moe": dict(rms_norm_eps=1e-6),
    "deepseek_v3": [dict(topk_group=4), dict(routed_scaling_factor=1.0),
                    dict(rope_interleave=False),
                    dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))],
    "deepseek_v2": [dict(topk_group=4), dict(routed_scaling_factor=1.0),
                    dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))],
    "granitemoe": [dict(embedding_multiplier=1.0), dict(residual_multiplier=1.0),
                   dict(attention_multiplier=8 ** -0.5), dict(logits_scaling=1.0)],
    # (clip_qkv=None crashes transformers 5.24's DBRX, torch.clamp(None, None); 1e6 never clamps)
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=1e6)),
    "gpt_oss": [dict(swiglu_limit=1e6), dict(sliding_window=64),
                dict(rope_parameters=dict(rope_type="default", rope_theta=150000.0))],
}


def family_config(family: str, **overrides) -> transformers.PreTrainedConfig:
  """The tiny transformers config of `family`, with `overrides` applied to its fields."""
  class_name, fields = _FAMILY_CONFIGS[family]
  common = dict(_COMMON)
  if family == "dbrx":  # its own names (d_model, n_heads, ...); kv heads live in attn_config
    common = dict(vocab_size=VOCAB, initializer_range=_COMMON["initializer_range"])
  kwargs = {**common, **copy.deepcopy(fields), **overrides}
  return getattr(transformers, class_name)(**kwargs)


def make_tokens(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> np.ndarray:
  """Random token ids [batch, seq] int32 below VOCAB."""
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)


def _perturb(model: torch.nn.Module) -> None:
  """RMSNorm and LayerNorm weights <- 1 + 0.3 N(0,1), biases <- 0.1 N(0,1), in place (seeded by the caller)."""
  with torch.no_grad():
    for module in model.modules():
      if type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
        module.weight.copy_(1.0 + 0.3 * torch.randn_like(module.weight))
    for name, param in model.named_parameters():
      if name.endswith(".bias") or name.endswith("_bias"):
        param.copy_(0.1 * torch.randn_like(param))
      elif name.endswith(".sinks"):  # GPT-OSS attention sinks, O(1) like the attention logits
        param.copy_(torch.randn_like(param))
    for name, buffer in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: steers the selection
        buffer.copy_(0.1 * torch.randn_like(buffer))


def torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
  """float32 logits [B, S, V] of a transformers causal LM on `tokens` [B, S], in eval mode."""
  model.eval()
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64))).logits
  return logits.float().numpy()


def _eager(config: transformers.PreTrainedConfig) -> transformers.PreTrainedConfig:
  config._attn_implementation = "eager"
  config._experts_implementation = "eager"
  return config


def _olmoe_clip_fractions(model: torch.nn.Module, tokens: np.ndarray) -> dict[str, float]:
  """Fraction of |q|, |k|, |v| entries above clip_qkv just before the clamp, over all layers."""
  clip = model.config.clip_qkv
  counts = {"q": [0, 0], "k": [0, 0], "v": [0, 0]}

  def hook(name):
    def record(_module, _inputs, output):
      counts[name][0] += int((output.abs() > clip).sum())
      counts[name][1] += output.numel()
    return record

  handles = []
  for layer in model.model.layers:
    attn = layer.self_attn
    # Clamped after q_norm / k_norm (whole-projection norms) and straight after v_proj.
    handles += [attn.q_norm.register_forward_hook(hook("q")),
                attn.k_norm.register_forward_hook(hook("k")),
                attn.v_proj.register_forward_hook(hook("v"))]
  try:
    torch_logits(model, tokens)
  finally:
    for handle in handles:
      handle.remove()
  return {name: above / total for name, (above, total) in counts.items()}


def _assert_detail_matters(family: str, model: torch.nn.Module, tokens: np.ndarray) -> None:
  if family == "olmoe":
    fractions = _olmoe_clip_fractions(model, tokens)
    assert all(0.05 <= f <= 0.7 for f in fractions.values()), (
        f"clip_qkv={model.config.clip_qkv} clamps fractions {fractions}; want 5%-70% of each")
  details = DETAIL_OFF.get(family, [])
  for off in details if isinstance(details, list) else [details]:
    cls = type(model)
    torch.manual_seed(0)
    other = cls(_eager(family_config(family, **off)))
    other.load_state_dict(model.state_dict())
    diff = np.max(np.abs(torch_logits(other, tokens) - torch_logits(model, tokens)))
    assert diff > 1e-2, f"{family}: {off} moves the logits by only {diff:.2e}"


def build_tiny(family: str, directory: str, seed: int = 0) -> str:
  """Builds `family`'s tiny random model, perturbs norms and biases, saves it to `directory`.

  Returns `directory`, which then holds config.json and model.safetensors as written by
  `save_pretrained`.
  """
  config = _eager(family_config(family))
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  _perturb(model)
  model.eval()
  _assert_detail_matters(family, model, make_tokens(seed))
  model.save_pretrained(directory)
  return directory


def load_reference_model(directory: str) -> torch.nn.Module:
  """transformers' model of a checkpoint directory: eager attention and experts, float32, eval.

  Asserts that no tensor was missing, unexpected or of the wrong shape.
  """
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      directory, output_loading_info=True, attn_implementation="eager",
      experts_implementation="eager", dtype=torch.float32)
  assert_clean_loading_info(info, directory)
  model.eval()
  return model


def assert_clean_loading_info(info: dict, directory: str = "") -> None:
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(key), f"transformers loading {directory}: {key} = {info[key]}"


def reference_logits(directory: str, tokens: np.ndarray) -> np.ndarray:
  """transformers' float32 logits [B, S, V] of the checkpoint in `directory` on `tokens` [B, S]."""
  return torch_logits(load_reference_model(directory), tokens)


def transformers_config(directory: str) -> transformers.PreTrainedConfig:
  """The config transformers reads from a checkpoint directory (class defaults filled in)."""
  return transformers.AutoConfig.from_pretrained(directory)


def read_config(directory: str) -> dict:
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def write_config(directory: str, config: dict) -> None:
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def checkpoint_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint: the index's shards, else model.safetensors."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return sorted({os.path.join(directory, name) for name in weight_map.values()})
  return [os.path.join(directory, "model.safetensors")]


def checkpoint_shapes(directory: str) -> dict[str, tuple[int, ...]]:
  """{tensor name: shape} over all safetensors files of a checkpoint."""
  shapes = {}
  for path in checkpoint_files(directory):
    with safe_open(path, "np") as f:
      for name in f.keys():
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes
