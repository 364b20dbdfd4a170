"""Trainers: small subclasses of ``nnsynth.training.engine.TrainingEngine`` (see ``registry.TRAINERS``)."""
