"""Dataset fingerprint and self-configuring plans (``nnsynth_plan_and_preprocess``)."""
