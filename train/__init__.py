"""Training side of ldm-pipeline: Lightning modules, Hydra entry point, export and sampling."""
