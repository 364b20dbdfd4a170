"""Training: the shared engine (``engine.TrainingEngine``), the trainer registry and the trainers."""
