"""Mixtral-8x7B-like recipe: 32 layers of width 4096, 8 experts of hidden 14336 per layer, top-2.

    python -m moe_jax.launch --target=tpu-pod --tpu_name=NAME --zone=ZONE \
        --config=configs/mixtral_like.py:v5p-64 --workdir=gs://BUCKET/mixtral [--run]
    python -m moe_jax.main --config=configs/mixtral_like.py:cpu8 --workdir=/tmp/mixtral_cpu8 \
        # with XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

Shapes from "Mixtral of Experts" (Jiang et al. 2024, arXiv:2401.04088, Table 1) and the released
config (https://huggingface.co/mistralai/Mixtral-8x7B-v0.1, config.json). Differences from Mixtral:
  * attention is multi-head (32 KV heads), not grouped-query (8 KV heads): this codebase has no GQA,
    so attention holds 4*D*D instead of 2.5*D*D parameters per layer (~47.5 B parameters in all
    instead of 46.7 B);
  * sequences of 4096 tokens, not 32k: attention materialises [B, H, S, S] float32 scores;
  * vocab_size 32000 sizes the embeddings like Mixtral's, but the default data pipeline is
    byte-level (ids < 259): the real vocabulary would come from a SentencePiece tokenizer task,
    not written yet.

Variants name the machine (see `moe_jax/targets.py`); each sets the mesh, the EP exchange and the
global batch (2 sequences of 4096 tokens per device, 1 on h100x8):
  v5p-64   (default) TPU v5p slice 2x4x4: 32 chips, 8 hosts. fsdp=8 x expert=4, all-to-all.
  v5p-128  TPU v5p slice 4x4x4 (one cube): 64 chips, 16 hosts. data=2 x fsdp=8 x expert=4,
           all-to-all.
  h100x8   one 8-GPU H100 host: fsdp=4 x expert=2, all-gather; parameters in bfloat16 to fit.
  h100x64  8 hosts of 8 H100: expert=8 inside a host (NVLink), fsdp=8 across hosts (InfiniBand),
           all-gather. The model puts the expert-weight gathers over InfiniBand above the compute.
  cpu8     the same architecture scaled down for 8 emulated CPU devices (expert=8): a seconds-long
           run of the expert-parallel path on a laptop.
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

  model.vocab_size = 32000  # Mixtral's SentencePiece vocabulary (byte pipeline ids are < 259).
  model.d_model = 4096  # Mixtral dim.
  model.num_layers = 32  # Mixtral n_layers.
  model.num_heads = 32  # Mixtral n_heads (all of them key/value heads here: no GQA).
  model.head_dim = 128  # Mixtral head_dim.
  model.mlp_dim = 14336  # Unused (every FFN is MoE); the Mistral-7B FFN width, for dense variants.
  model.max_len = 4096  # Training context; Mixtral's is 32768.
  model.dtype = "bfloat16"  # Activations and matmuls in bf16 (accumulation stays float32).
  model.param_dtype = "float32"  # Master weights and AdamW moments in float32.
  model.moe_every = 1  # Every layer's FFN is an MoE layer, as in Mixtral.
  model.remat = True  # Recompute each block in the backward pass: activations dominate otherwise.
  model.tie_embeddings = False  # Mixtral has a separate output projection (lm_head).
  model.rope_base = 1e6  # Mixtral rope_theta (config.json).
  model.norm_eps = 1e-5  # Mixtral rms_norm_eps (config.json).

  moe.num_experts = 8  # Mixtral num_experts.
  moe.top_k = 2  # Mixtral top_k_experts; the two weights renormalised (normalize_top_k=True).
  moe.capacity_factor = None  # Dropless (MegaBlocks-style), as Mixtral's reference implementation.
  moe.expert_hidden_dim = 14336  # Mixtral hidden_dim: each expert is a Mistral-7B SwiGLU FFN.

  data.seq_len = 4096  # Tokens per sequence; equals model.max_len.

  # Llama 2 (Touvron et al. 2023, Sec. 2.2) schedule for 7B-13B models; Mixtral's is unpublished.
  train.learning_rate = 3e-4  # Peak learning rate.
  train.warmup_steps = 2000  # Linear warmup steps.
  train.steps = 250_000  # 250k steps x ~0.26M tokens (v5p-64) = ~65B tokens.
  train.log_every = 10  # Steps between log lines (a step takes seconds at this size).
  train.eval_every = 1000  # Steps between evaluations.
  train.checkpoint_every = 1000  # Steps between checkpoints (preemption loses at most this many).

  target = targets.get_target(variant)
  if variant == "v5p-64":
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 1, 8, 4, 1  # 32 chips, 2 experts per chip.
    # Twice the all-gather's bytes, but the model gives rings one torus dimension's links only.
    moe.ep_exchange = "all_to_all"  # Padded all-to-all: ranked first here (see the docstring).
  elif variant == "v5p-128":
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 2, 8, 4, 1  # 64 chips.
    moe.ep_exchange = "all_to_all"  # As for v5p-64.
  elif variant == "h100x8":
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 1, 4, 2, 1  # All over NVLink.
    moe.ep_exchange = "allgather"  # Moves (ep-1) T D, half the padded all-to-all's (ep-1) K T D.
    # 47.5 B parameters x (param + grad + 2 AdamW moments) = 760 GB in float32 > 8 x 80 GB; in
    # bfloat16 it is 380 GB. Updates below bf16 resolution are lost (no stochastic rounding), so use
    # this variant for systems work and h100x64 for a faithful run.
    model.param_dtype = "bfloat16"  # Halves parameter and optimizer memory to fit one host.
  elif variant == "h100x64":
    # Inner mesh axes vary fastest (sharding.make_mesh), so expert=8 stays inside one NVLink host.
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 1, 8, 8, 1  # 64 GPUs.
    moe.ep_exchange = "allgather"  # As for h100x8.
  elif variant == "cpu8":
    _scale_down(config)
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 1, 1, 8, 1  # One expert per emulated device.
  per_device = 1 if variant == "h100x8" else 2  # h100x8: memory is tight (see above).
  data.batch_size = per_device * target.num_devices  # Global batch B.
  return config


def _scale_down(config) -> None:
  """Shrinks the model and run to seconds on 8 CPU devices, keeping the MoE structure (E=8, K=2)."""
  model, moe, data, train = config.model, config.model.moe, config.data, config.train
  model.vocab_size = 259  # Byte vocabulary.
  model.d_model = 64  # Width D.
  model.num_layers = 2  # Blocks, both MoE.
  model.num_heads = 4  # Heads.
  model.head_dim = 16  # Per-head width.
  model.mlp_dim = 224  # 3.5 x D, Mixtral's hidden/dim ratio (14336 / 4096).
  model.max_len = 64  # Context.
  model.dtype = "float32"  # XLA:CPU emulates bf16 matmuls slowly; the path is the same.
  moe.expert_hidden_dim = 224  # 3.5 x D, as above.
  data.seq_len = 64  # Tokens per sequence.
  data.eval_batches = 2  # Validation batches.
  train.learning_rate = 3e-3  # The default small-model rate.
  train.warmup_steps = 5  # Warmup.
  train.steps = 20  # Steps.
  train.log_every = 5  # Log interval.
  train.eval_every = 10  # Evaluation interval.
  train.checkpoint_every = 10  # Checkpoint interval.
