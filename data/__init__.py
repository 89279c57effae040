"""Data side of ldm-pipeline: the procedural shapes demo set and its checker, shard writing in
img2dataset layout, and a LightningDataModule that streams image-text WebDataset shards."""
