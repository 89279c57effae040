"""Image-quality evaluation: feature extractors, FID/KID/CLIP score, reference statistics."""
