"""moe_jax: Mixture-of-Experts layers, models and training in JAX / Flax NNX."""
