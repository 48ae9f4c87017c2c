"""DeepSeek-V2-Lite-like fine-grained MoE recipe: 64 routed experts of hidden 1408, top-6, 2 shared.

    python -m moe_jax.launch --target=gpu-hosts --hosts=h1,h2,h3,h4,h5,h6,h7,h8 \
        --config=configs/deepseek_like.py:h100x64 --workdir=/shared/deepseek [--run]
    python -m moe_jax.main --config=configs/deepseek_like.py:cpu8 --workdir=/tmp/deepseek_cpu8 \
        # with XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

Shapes from "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model"
(DeepSeek-AI 2024, arXiv:2405.04434, Appendix: DeepSeek-V2-Lite) and the released config
(https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite, config.json): d_model 2048, 27 layers,
16 heads, 64 routed experts top-6 plus 2 shared experts, expert hidden 1408: DeepSeekMoE's
fine-grained experts (DeepSeek-V3 scales the same design to 256 routed experts, top-8, 1 shared).
Differences from DeepSeek-V2-Lite:
  * every layer is an MoE layer: V2-Lite's first layer is a dense FFN (hidden 10944), but the schema
    has only `moe_every`, so moe_every=1 (one extra MoE layer, ~0.3 B more parameters);
  * multi-head attention with head_dim 128 instead of Multi-head Latent Attention (MLA);
  * sequences of 4096 tokens (V2-Lite was pretrained at 4K and extended to 32K);
  * vocab_size 102400 sizes the embeddings like DeepSeek's, but the default data pipeline is
    byte-level (ids < 259): the real vocabulary would come from a tokenizer task, not written yet;
  * dropless routing (DeepSeek-V2 trained with device-limited routing and token dropping; V2-Lite
    kept all experts of a layer on one device).
About 16.3 B parameters in all (V2-Lite: 15.7 B); 2.3 B active per token without the two
embedding matrices (V2-Lite: 2.4 B).

Variants name the machine (see `moe_jax/targets.py`); each sets the mesh, the EP exchange and the
global batch (2 sequences of 4096 tokens per device). With K=6 the all-gather exchange moves
(ep-1) T D bytes against the padded all-to-all's (ep-1) K T D, so every variant uses it:
  v5p-64   (default) TPU v5p slice 2x4x4: 32 chips, 8 hosts. data=4 x fsdp=2 x expert=4.
  v5p-128  TPU v5p slice 4x4x4: 64 chips, 16 hosts. data=8 x fsdp=2 x expert=4.
  h100x8   one 8-GPU H100 host: fsdp=2 x expert=4.
  h100x64  8 hosts of 8 H100: fsdp=2 x expert=4 inside a host (NVLink), data=8 across hosts.
  cpu8     the same architecture scaled down for 8 emulated CPU devices (64 experts, expert=8).
None of the accelerator variants has been run here (no TPU or GPU was available); they pass
`validate_config` on their device count. Each mesh and `moe.ep_exchange` is what
`experiments/comm_model.py --modes=any --max_axis=tensor=1 --memory_fraction=0.7` ranks first: the
fastest estimated MoE step among data x fsdp x expert layouts and the exchanges the EP layer
implements today, with a memory lower bound that leaves 30% of HBM for what the bound omits. The
dropless all-to-all pads every destination's buffer to T_local * K rows, so the all-gather
exchange usually wins; rerun the model when an exact ragged all-to-all lands.
"""
from configs import default
from moe_jax import targets


def get_config(variant: str | None = None):
  """Returns the config for target `variant` (default "v5p-64"); ValueError for unknown names."""
  variant = variant or "v5p-64"
  allowed = ("v5p-64", "v5p-128", "h100x8", "h100x64", "cpu8")
  if variant not in allowed:
    raise ValueError(f"Unknown config variant {variant!r}; allowed: {allowed}.")
  config = default.get_config()
  model, moe, mesh, data, train = (config.model, config.model.moe, config.mesh, config.data,
                                   config.train)

  model.vocab_size = 102400  # DeepSeek-V2 tokenizer size (the byte pipeline uses ids < 259).
  model.d_model = 2048  # V2-Lite hidden_size.
  model.num_layers = 27  # V2-Lite num_hidden_layers.
  model.num_heads = 16  # V2-Lite num_attention_heads.
  model.head_dim = 128  # V2-Lite v_head_dim (MHA here instead of MLA).
  model.mlp_dim = 10944  # V2-Lite dense FFN width (unused: every FFN is MoE here, see docstring).
  model.max_len = 4096  # Training context.
  model.dtype = "bfloat16"  # Activations and matmuls in bf16 (accumulation stays float32).
  model.param_dtype = "float32"  # Master weights and AdamW moments in float32.
  model.moe_every = 1  # Every layer MoE; V2-Lite's first layer is dense, the schema can't say so.
  model.remat = True  # Recompute each block in the backward pass.
  model.tie_embeddings = False  # DeepSeek-V2 has a separate output projection.

  moe.num_experts = 64  # V2-Lite n_routed_experts.
  moe.top_k = 6  # V2-Lite num_experts_per_tok.
  moe.capacity_factor = None  # Dropless.
  moe.expert_hidden_dim = 1408  # V2-Lite moe_intermediate_size (fine-grained experts).
  moe.num_shared_experts = 2  # V2-Lite n_shared_experts: always-on FFN of hidden 2 x 1408.
  moe.normalize_top_k = False  # V2-Lite norm_topk_prob=false: raw softmax weights of the top 6.
  # V2-Lite's expert-level balance factor alpha_1 (DeepSeek-V2 paper, Appendix); its f_i * P_i form
  # equals ours (f_i = fraction of the T*K assignments, times E), so the number carries over.
  moe.load_balance_loss_weight = 0.001  # V2-Lite alpha_1.

  moe.ep_exchange = "allgather"  # See the docstring (cpu8 included: it exercises the same path).

  data.seq_len = 4096  # Tokens per sequence; equals model.max_len.

  # V2-Lite's AdamW settings (DeepSeek-V2 paper, Appendix; betas, decay and clipping equal the
  # defaults); its step decay is replaced by the default cosine.
  train.learning_rate = 4.2e-4  # V2-Lite peak learning rate.
  train.warmup_steps = 2000  # V2-Lite linear warmup steps.
  train.steps = 250_000  # 250k steps x ~0.26M tokens (v5p-64) = ~65B tokens.
  train.log_every = 10  # Steps between log lines.
  train.eval_every = 1000  # Steps between evaluations.
  train.checkpoint_every = 1000  # Steps between checkpoints.

  target = targets.get_target(variant)
  if variant == "v5p-64":
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 4, 2, 4, 1  # 32 chips, 16 experts per chip.
  elif variant == "v5p-128":
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 8, 2, 4, 1  # 64 chips.
  elif variant == "h100x8":
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 1, 2, 4, 1  # All over NVLink.
  elif variant == "h100x64":
    # Inner mesh axes vary fastest (sharding.make_mesh): fsdp x expert = 8 is one NVLink host.
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 8, 2, 4, 1  # 64 GPUs.
  elif variant == "cpu8":
    _scale_down(config)
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 1, 1, 8, 1  # 8 experts per emulated device.
  data.batch_size = 2 * target.num_devices  # Global batch B: 2 sequences per device.
  return config


def _scale_down(config) -> None:
  """Shrinks the model and run to seconds on 8 CPU devices, keeping E=64, K=6, 2 shared experts."""
  model, moe, data, train = config.model, config.model.moe, config.data, config.train
  model.vocab_size = 259  # Byte vocabulary.
  model.d_model = 64  # Width D.
  model.num_layers = 2  # Blocks, both MoE.
  model.num_heads = 4  # Heads.
  model.head_dim = 16  # Per-head width.
  model.mlp_dim = 256  # Dense width (unused).
  model.max_len = 64  # Context.
  model.dtype = "float32"  # XLA:CPU emulates bf16 matmuls slowly; the path is the same.
  moe.expert_hidden_dim = 44  # ~0.69 x D, V2-Lite's expert/dim ratio (1408 / 2048).
  data.seq_len = 64  # Tokens per sequence.
  data.eval_batches = 2  # Validation batches.
  train.learning_rate = 3e-3  # The default small-model rate.
  train.warmup_steps = 5  # Warmup.
  train.steps = 20  # Steps.
  train.log_every = 5  # Log interval.
  train.eval_every = 10  # Evaluation interval.
  train.checkpoint_every = 10  # Checkpoint interval.
