"""latentdiffusion: a from-scratch latent diffusion library (VAE, conditional UNet, CLIP text conditioner,
schedulers, classifier-free guidance) that trains on your data and loads Stable Diffusion 1.x weights."""

__version__ = "0.1.0"
