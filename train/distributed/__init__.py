"""Scaling out: Lightning strategies that also run on CPU, gathering shards, checkpoint files."""
