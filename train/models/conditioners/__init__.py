"""Frozen text conditioning: encoders and tokenizers, as the diffusers pipelines use them."""
