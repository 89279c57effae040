"""Test and development support: a local SLURM cluster for trying the SLURM path."""
