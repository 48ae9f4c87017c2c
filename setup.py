"""moe_jax: Mixture-of-Experts research codebase in JAX / Flax NNX."""
import setuptools

setuptools.setup(
    name="moe_jax",
    version="0.1.0",
    description="Composable, fast and honest Mixture-of-Experts layers and models in JAX/Flax NNX.",
    packages=setuptools.find_packages(include=["moe_jax", "moe_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[  # "ml_dtypes" (bf16 safetensors) comes with jax
        # Lower bounds checked with JAX 0.10.2 (CPU, Python 3.11) and 0.11.x (CUDA, Python 3.12).
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "clu>=0.0.12",
        "tensorboard>=2.15",  # clu's summary writer imports it
        "seqio>=0.0.19",
        "numpy>=1.26",
    ],
    extras_require={
        # The Hugging Face tests also need torch (install it first, a CPU build: see README) and
        # transformers; neither is a dependency of moe_jax itself.
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "chex>=0.1.88", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", "matplotlib>=3.8", "transformers>=5.0", "safetensors>=0.4",
                 "tokenizers>=0.19"],
        # Hugging Face checkpoints in and out (moe_jax.hf, moe_jax.convert): no torch at run time.
        "hf": ["safetensors>=0.4", "tokenizers>=0.19"],
        "notebooks": ["jupyter", "matplotlib>=3.8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        "bench": ["tokamax"],
    },
)
