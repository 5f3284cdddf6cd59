"""diffusax: diffusion models in JAX/Flax, trained and sampled with one loop."""

__version__ = "0.1.0"
