"""Job submission (SLURM, Kubernetes) for ldm-pipeline runs."""
