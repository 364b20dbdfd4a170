"""Built-in demo dataset: simulated multi-sequence brain MRI with tumours on real MNI ICBM152 anatomy.

``make_demo_dataset`` writes a raw dataset (CONTRACT.md section 2); ``DemoGenerator`` simulates single
subjects in memory (used by tests that need images with known tissue maps).
"""
from nnsynth.dataset.demo.anatomy import SEQUENCE_TABLE, TISSUE_TABLE, load_template
from nnsynth.dataset.demo.generator import DemoConfig, DemoGenerator, SimulatedCase, make_demo_dataset

__all__ = ["make_demo_dataset", "DemoConfig", "DemoGenerator", "SimulatedCase", "SEQUENCE_TABLE",
           "TISSUE_TABLE", "load_template"]
