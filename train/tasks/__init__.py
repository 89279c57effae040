"""LightningModules, one per training task: the autoencoder (stage 1) and latent diffusion."""
