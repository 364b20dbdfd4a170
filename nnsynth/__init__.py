"""nnsynth: self-configuring multi-sequence MRI synthesis in the style of nnU-Net."""

__version__ = "0.1.0"
