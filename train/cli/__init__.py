"""The console scripts (ldm-train, ldm-data, ldm-export, ldm-sample, ldm-eval, ldm-mlflow-sync)."""
