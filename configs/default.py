"""Default experiment: a small byte-level MoE decoder LM on the interpreter's stdlib sources.

    python -m moe_jax.main --config=configs/default.py --workdir=/tmp/moe_default
    python -m moe_jax.main --config=configs/default.py:dense --workdir=/tmp/dense_default

Variants (big_vision style, `--config=configs/default.py:VARIANT`):
  (none)  MoE FFN in every other layer: 8 experts, token-choice top-2, dropless.
  dense   The dense baseline with the same active FLOPs per token: every FFN is an MLP whose
          hidden size equals top_k * expert_hidden_dim (a FieldReference: it follows overrides
          of either field).
  tiny    A seconds-long run on the synthetic task, used by the tests.
"""
import ml_collections

from moe_jax.models import mla, rope


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `variant` is the text after ':' in --config."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, data order and router noise.

  config.model = model = ml_collections.ConfigDict()
  model.vocab_size = 259  # seqio.ByteVocabulary: 3 special ids (pad 0, eos 1, unk 2) + 256 bytes.
  model.d_model = 128  # Residual stream width D.
  model.num_layers = 4  # Decoder blocks.
  model.num_heads = 4  # Attention heads.
  model.head_dim = 32  # Per-head width; num_heads * head_dim need not equal d_model.
  model.mlp_dim = 512  # Hidden size F of the dense FFN layers.
  model.max_len = 512  # Longest sequence the model accepts (RoPE needs no table; checked vs seq_len).
  model.dtype = "float32"  # Activation/compute dtype ("float32" | "bfloat16").
  model.param_dtype = "float32"  # Parameter storage dtype.
  model.moe_every = 2  # Every n-th FFN is an MoE layer (layers n-1, 2n-1, ...); 0 = dense model.
  model.remat = False  # Rematerialise each block in the backward pass (saves memory, costs FLOPs).
  # FFN activation, shared by MLP and experts ("swiglu" | "gelu" | "swiglu_clamped").
  model.activation = "swiglu"
  model.tie_embeddings = True  # Output projection reuses the input embedding.
  model.rope_base = 10_000.0  # RoPE wavelength base.
  # RoPE context-extension scaling (models/rope.py): kind "none" | "llama3" | "yarn" and its fields.
  model.rope_scaling = rope.default_scaling()
  model.rope_interleaved = False  # RoPE pairs (2i, 2i+1) (DeepSeek) instead of (i, i + Dh/2).
  model.norm = "rms"  # Block and final norm: "rms" (RMSNorm) | "layer" (bias-free LayerNorm, DBRX).
  model.norm_eps = 1e-6  # Norm epsilon.
  model.attention = "mha"  # "mha" (multi-head / grouped-query) | "mla" (DeepSeek's latent attention).
  model.mla = mla.default_mla()  # attention="mla": q_lora_rank, kv_lora_rank, head dims.
  model.num_kv_heads = 0  # Key/value heads (grouped-query attention); 0 = num_heads (MHA).
  model.qk_norm = "none"  # RMSNorm of queries and keys: "none" | "head" (Qwen3) | "projection" (OLMoE).
  model.attention_bias = False  # Biases on the q, k, v projections (Qwen2).
  model.attention_out_bias = False  # Bias on the output projection.
  # Clamp q, k, v to [-c, c] after the qk-norm (OLMoE's clip_qkv); None = no clamp.
  model.clip_qkv = ml_collections.config_dict.placeholder(float)
  model.sliding_window = 0  # Keys visible from query q: q - window < k <= q; 0 = all (causal).
  # Layers with the window, e.g. (0, 2, 4) (GPT-OSS alternates); None = every layer.
  model.sliding_window_layers = ml_collections.config_dict.placeholder(tuple)
  model.attention_sinks = False  # A learned per-head sink logit in each softmax (GPT-OSS).
  # activation="swiglu_clamped" (GPT-OSS): (clip(up) + 1) * g * sigmoid(alpha g), g = min(gate, limit).
  model.swiglu_alpha = 1.702
  model.swiglu_limit = 7.0
  # Explicit MoE layer indices, e.g. (1, 2, 3); None = every moe_every-th layer.
  model.moe_layers = ml_collections.config_dict.placeholder(tuple)
  model.scale_tied_logits = True  # Tied logits times 1/sqrt(D) (ours); False for imported models.
  # muP-style scales (Granite-MoE; 1 / 0 = off): embeddings times embedding_multiplier, each block
  # branch times residual_multiplier, attention scores times attention_scale (0 = head_dim^-0.5),
  # logits divided by logit_divisor.
  model.embedding_multiplier = 1.0
  model.residual_multiplier = 1.0
  model.attention_scale = 0.0
  model.logit_divisor = 1.0
  # Causal attention (a decoder LM, data.objective="lm"); False = a bidirectional encoder, which
  # needs data.objective="mlm" (configs/encoder.py).
  model.causal = True

  model.moe = moe = ml_collections.ConfigDict()
  # Routing method: "token_choice" | "expert_choice" | "soft" | "top_p" | "relu" | "random"
  # (moe_jax/routing.py). Expert choice and soft MoE see the whole group: with group_by="sequence"
  # they leak future tokens in this causal decoder; group_by="position" does not.
  moe.router = "token_choice"
  moe.num_experts = 8  # Routed experts E.
  moe.top_k = 2  # Experts per token K.
  # None = dropless; a float > 0 = capacity buffers with dropping. A float placeholder, so that
  # --config.model.moe.capacity_factor=1.25 can set it from the command line.
  moe.capacity_factor = ml_collections.config_dict.placeholder(float)
  # (expert choice: required; C = capacity_factor * group tokens / E, the paper's c.)
  moe.group_by = "sequence"  # Groups of consecutive tokens of a sequence, or "position" (the
  #   tokens at one position across the batch: causal for expert choice and soft MoE).
  moe.group_size = 0  # Tokens per group; 0 = one row (a sequence, or the batch at one position).
  # Validation rejects routing that lets a token's output depend on later tokens in this causal
  # decoder (expert choice / soft MoE over sequence groups, capacity dropping or batch-prioritized
  # routing over sequence groups). True accepts it: the model then sees the future in training
  # and evaluation, so its validation loss is NOT a language-model loss and cannot be compared
  # with causal runs; it also cannot decode token by token.
  moe.allow_noncausal = False
  moe.capacity_priority = "position"  # Capacity claim order: "position" (Switch) or "score"
  #   (batch-prioritized routing, V-MoE: most confident tokens first).
  moe.expert_hidden_dim = 256  # Hidden size of each expert; K * this = dense mlp_dim (equal FLOPs).
  moe.num_shared_experts = 0  # Always-on experts beside the routed ones (DeepSeekMoE).
  moe.shared_expert_hidden_dim = 0  # Hidden size of the shared expert(s) together; 0 = n * expert's.
  moe.shared_expert_gate = False  # Shared output times sigmoid(x w) per token (Qwen2-MoE).
  moe.router_bias = False  # A learned router logit bias b [E]: logits = x W + b (GPT-OSS).
  moe.expert_bias = False  # Per-expert biases after each expert projection (GPT-OSS).
  moe.normalize_top_k = True  # Renormalise the K selected probabilities to sum to 1 (Mixtral).
  moe.score_function = "softmax"  # Token-choice scores: "softmax" | "sigmoid" (DeepSeek-V3).
  moe.num_expert_groups = 1  # Group-limited routing: experts in n groups (DeepSeek-V3); 1 = off.
  moe.top_k_groups = 1  # ... each token picks experts inside its top-m groups.
  moe.group_score = "top2_sum"  # Group score: "top2_sum" (DeepSeek-V3) | "max" (DeepSeek-V2).
  moe.routed_scaling_factor = 1.0  # Multiplies the routed experts' weights (DeepSeek-V3).
  moe.bias_update_rate = 0.0  # Auxiliary-loss-free balancing bias step u; 0 = off (Wang 2024).
  moe.selection_bias = False  # Hold the selection bias even with u = 0 (imported DeepSeek-V3).
  moe.router_jitter = 0.0  # Training-only multiplicative router-input noise eps (Switch).
  moe.router_noise_std = 0.0  # Training-only Gaussian logit noise, noisy top-k (V-MoE: 1/E).
  moe.router_noise = "fixed"  # Noisy top-k std: "fixed" = router_noise_std (V-MoE) | "learned" =
  #   Softplus(x W_noise) per token and expert, W_noise zero-initialised (Shazeer et al. 2017).
  moe.top_p_threshold = 0.4  # router="top_p": cumulative probability p (Huang et al. 2024).
  moe.top_p_loss_weight = 1e-4  # router="top_p": weight of the dynamic (entropy) loss.
  moe.max_experts_per_token = 0  # router="top_p": cap on experts per token; 0 = E.
  moe.relu_target_sparsity = 0.0  # router="relu": target zero-gate fraction; 0 = 1 - K/E.
  moe.relu_l1_initial = 1e-8  # router="relu": initial L1 coefficient lambda_0 (ReMoE).
  moe.relu_l1_update_factor = 1.2  # router="relu": lambda multiplier per step (ReMoE's alpha).
  moe.soft_slots_per_expert = 0  # router="soft": slots p per expert; ceil(K*N/E) = top-K FLOPs.
  moe.soft_normalize = True  # router="soft": L2-normalise inputs and slot parameters (Sec 2.3).
  moe.num_zero_experts = 0  # MoE++ zero-computation experts (output 0).
  moe.num_copy_experts = 0  # MoE++ copy experts (output x).
  moe.num_constant_experts = 0  # MoE++ constant experts (a1 x + a2 v).
  moe.zero_expert_balance_weight = 1.0  # MoE++ tau: weight of the zero/copy/constant experts'
  #   balance-loss terms (heterogeneous load balance loss); 1.0 = ordinary experts.
  moe.num_null_experts = 0  # AdaMoE null experts (output 0, weights renormalised over FFN ones).
  moe.load_balance_loss_weight = 0.01  # Switch Transformer balance loss coefficient (alpha).
  moe.balance_scope = "global"  # Balance statistics over the "global" batch or per "micro_batch".
  moe.balance_micro_batch_size = 2  # Sequences per micro-batch for balance_scope="micro_batch".
  moe.router_z_loss_weight = 1e-3  # ST-MoE router z-loss coefficient.
  moe.importance_loss_weight = 0.0  # V-MoE importance loss coefficient.
  moe.noisy_load_loss_weight = 0.0  # V-MoE load loss coefficient (needs router_noise_std > 0).
  moe.gmm_backend = "auto"  # Grouped matmul backend ("auto" | "xla" | "reference" | ...).
  # Grouped matmul tiles, None = the backend's default: "gpu"/"tpu" (tm, tk, tn), e.g.
  # --config.model.moe.gmm_tiling="(128,128,128)"; "blocked" decreasing row tiles, e.g. "(256,64)".
  # A per-pass dict {"fwd", "dlhs", "drhs"} can be set in a config file (see pallas_kernels.gmm).
  moe.gmm_tiling = ml_collections.config_dict.placeholder(tuple)
  # Expert-parallel token exchange: "all_to_all" | "allgather" | "ragged_all_to_all" (dropless only:
  # sends just the routed rows; XLA's collective on GPU/TPU, a padded stand-in on CPU).
  moe.ep_exchange = "all_to_all"
  # "ragged_all_to_all" receive buffer: ceil(f * T_local * K) rows per device (balanced load: f=1);
  # 0 = the exact worst case ep * T_local * K. A step that needs more uses the padded exchange.
  moe.ep_recv_buffer_factor = 0.0

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel axis size; -1 = all remaining devices.
  mesh.fsdp = 1  # Fully-sharded data-parallel axis size.
  mesh.expert = 1  # Expert-parallel axis size (must divide num_experts).
  mesh.tensor = 1  # Tensor-parallel axis size.

  config.data = data = ml_collections.ConfigDict()
  data.task = "stdlib_bytes"  # seqio task ("stdlib_bytes" | "text_files" | "synthetic").
  data.path = ""  # Glob of text files for task "text_files".
  # "text_files": a tokenizer.json (or a directory holding one) to pack text with; "" = bytes.
  data.tokenizer = ""
  data.batch_size = 16  # Global batch size B (sequences per step).
  data.seq_len = 128  # Tokens per sequence S.
  data.reader = "auto"  # "seqio" | "numpy" | "auto" (seqio when TensorFlow imports, else numpy).
  # Validation batches per evaluation: a fixed sample of eval_batches * batch_size chunks spread
  # over the whole split (every file represented; the whole split when it has fewer chunks).
  data.eval_batches = 32
  # "lm" = next-byte prediction; "mlm" = masked-byte prediction (BERT 2019) for an encoder
  # (model.causal=False; needs model.vocab_size >= 260 for the [MASK] id 259).
  data.objective = "lm"
  data.mask_rate = 0.15  # "mlm": fraction of each sequence's bytes masked and predicted.

  config.train = train = ml_collections.ConfigDict()
  train.steps = 1500  # Optimiser steps.
  train.learning_rate = 3e-3  # Peak learning rate after warmup.
  train.warmup_steps = 100  # Linear warmup steps.
  train.schedule = "cosine"  # "cosine" (warmup + cosine decay) | "wsd" (warmup-stable-decay).
  # Steps the schedule is laid over; 0 = train.steps at the first start. Saved with checkpoints:
  # a resume with a larger train.steps keeps the saved horizon (the final rate is held past it)
  # unless this is set, which lays the schedule over the new horizon (and is logged).
  train.schedule_steps = 0
  train.decay_fraction = 0.1  # "wsd": the final fraction of the horizon decays linearly.
  train.end_learning_rate_fraction = 0.1  # The schedule ends at this fraction of the peak.
  train.weight_decay = 0.1  # AdamW decoupled weight decay (matrices only).
  train.b1 = 0.9  # AdamW beta1.
  train.b2 = 0.95  # AdamW beta2.
  train.grad_clip_norm = 1.0  # Global gradient-norm clipping; 0 disables.
  train.log_every = 50  # Steps between training log lines / summaries.
  train.eval_every = 250  # Steps between evaluations (and at the end).
  train.checkpoint_every = 500  # Steps between checkpoints (and at the end).
  train.keep_checkpoints = 3  # Checkpoints kept on disk.
  # Micro-batches per step (gradient accumulation, summed in float32 in one jitted step; divides
  # data.batch_size). Balance statistics and router-state updates use the whole global batch.
  train.grad_accum_steps = 1

  if variant in (None, ""):
    pass
  elif variant == "dense":
    model.moe_every = 0
    # A reference, so that overriding top_k or expert_hidden_dim keeps the equal-FLOPs pairing.
    model.mlp_dim = moe.get_ref("top_k") * moe.get_ref("expert_hidden_dim")
  elif variant == "tiny":
    model.d_model = 32
    model.num_layers = 2
    model.num_heads = 2
    model.head_dim = 16
    model.mlp_dim = 64
    model.max_len = 64
    moe.num_experts = 4
    moe.expert_hidden_dim = 32
    data.task = "synthetic"
    data.batch_size = 8
    data.seq_len = 32
    data.eval_batches = 2
    train.steps = 40
    train.warmup_steps = 5
    train.log_every = 10
    train.eval_every = 20
    train.checkpoint_every = 20
  else:
    raise ValueError(f"Unknown config variant {variant!r}; allowed: '', 'dense', 'tiny'.")
  return config
