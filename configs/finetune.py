r"""Fine-tuning an imported (or previously trained) model on local text.

    python -m moe_jax.main --config=configs/finetune.py --workdir=/runs/olmoe_ft \
        --config.init.hf_path=/path/to/OLMoE --config.data.path='/data/*.txt'
    python -m moe_jax.main --config=configs/finetune.py --workdir=/runs/ft2 \
        --config.init.workdir=/ckpt/mixtral --config.data.path='/data/**/*.md' \
        --config.init.freeze_router=True

configs/default.py with a fine-tuning schedule (peak learning rate 1e-4 after 20 warmup steps,
cosine decay over 500 steps, no weight decay), task "text_files", and the `init` section
(`moe_jax.train.resolve_config`):

  init.hf_path         A Hugging Face checkpoint directory (config.json + safetensors).
  init.workdir         Or a workdir: converted (`python -m moe_jax.convert --from_hf`) or trained
                       here; its latest checkpoint's parameters (and router state) are read.
  init.freeze_router   Zero the updates of the routers (parameters under .../router/).
  init.freeze_experts  Zero the updates of the experts (routed and shared; ST-MoE fine-tunes the
                       non-MoE parameters only with both set).
  init.dtype           Parameter and compute dtype; "" = the checkpoint's (e.g. "float32" to keep
                       float32 master weights of a bfloat16 checkpoint).
  init.remat           Rematerialise every block in the backward pass.
  init.load_balance_loss_weight, init.router_z_loss_weight
                       The MoE auxiliary losses; None = the checkpoint's (a hub config's
                       router_aux_loss_coef, no z-loss).

The model section is the checkpoint's, entirely: `config.model` must stay at configs/default.py's
values (validation names any changed field). The parameters are loaded onto the training mesh
(`config.mesh`) in place of the random init and the optimizer starts fresh at step 0; rerunning the
command resumes the workdir's own checkpoints without reading the source again.

Text is tokenised with `data.tokenizer`; left empty it becomes the checkpoint's tokenizer
(HF_PATH/tokenizer.json or WORKDIR/tokenizer/), and a source without one keeps the byte
vocabulary, which needs a model of >= 259 ids. The tokenizer files are copied to
WORKDIR/tokenizer/, so `moe_jax.sample` and `moe_jax.convert --to_hf` read the fine-tuned workdir
like a converted one.
"""
import ml_collections

from configs import default


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; there are no variants."""
  if variant not in (None, ""):
    raise ValueError(f"Unknown config variant {variant!r}; configs/finetune.py has none.")
  config = default.get_config()

  config.init = init = ml_collections.ConfigDict()
  init.hf_path = ""  # Hugging Face checkpoint directory to start from.
  init.workdir = ""  # Or a converted / trained workdir to start from ("" = neither).
  init.freeze_router = False  # Router parameters get zero updates.
  init.freeze_experts = False  # Expert parameters (routed and shared) get zero updates.
  init.dtype = ""  # "" = the checkpoint's; "float32" | "bfloat16" | "float16".
  init.remat = False  # Rematerialise each block in the backward pass.
  # MoE auxiliary-loss weights; None = the checkpoint's.
  init.load_balance_loss_weight = ml_collections.config_dict.placeholder(float)
  init.router_z_loss_weight = ml_collections.config_dict.placeholder(float)

  data = config.data
  data.task = "text_files"
  data.path = ""  # Required: a glob of text files, e.g. '/data/**/*.txt'.
  # tokenizer.json (or a directory holding one); "" = the checkpoint's (or bytes if it has none).
  data.tokenizer = ""
  data.batch_size = 16
  data.seq_len = 512
  data.eval_batches = 8

  train = config.train
  train.steps = 500
  train.learning_rate = 1e-4
  train.warmup_steps = 20
  train.weight_decay = 0.0
  train.log_every = 10
  train.eval_every = 100
  train.checkpoint_every = 250
  train.keep_checkpoints = 2
  return config
