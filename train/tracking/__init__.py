"""What a run records: MLflow logging through a durable spool, lineage, sweeps, secrets."""
