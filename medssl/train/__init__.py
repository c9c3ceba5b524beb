"""Training: schedules, optimisers, checkpoints (the trainer loop, DDP and MLflow follow)."""
