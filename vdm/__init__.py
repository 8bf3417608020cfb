"""Variational Diffusion Models in JAX/Flax: schedules, the ELBO, samplers, the U-Net and training."""
from vdm import elbo, samplers, schedules

__all__ = ["elbo", "samplers", "schedules"]
