"""Every fixed constant of the project in one place.

Values that depend on a dataset or a machine live in the plans instead (see ``nnsynth.planning``).
"""
from __future__ import annotations

# --- folders (CONTRACT.md section 1) ---------------------------------------------------------------
ENV_RAW = "nnSynth_raw"
ENV_PREPROCESSED = "nnSynth_preprocessed"
ENV_RESULTS = "nnSynth_results"
DEFAULT_DATA_ROOT = "nnsynth_data"
DEFAULT_SUBFOLDERS = {ENV_RAW: "raw", ENV_PREPROCESSED: "preprocessed", ENV_RESULTS: "results"}

# --- raw dataset format (CONTRACT.md section 2) ----------------------------------------------------
SUPPORTED_FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
REQUIRED_DATASET_JSON_KEYS = ("channel_names", "numTraining", "file_ending")
GEOMETRY_RELATIVE_TOLERANCE = 1e-4
CHANNEL_ID_DIGITS = 4
DATASET_ID_DIGITS = 3
MIN_SEQUENCES_IN_DATASET = 2

# --- fingerprint -----------------------------------------------------------------------------------
FINGERPRINT_MAX_VOXELS_TOTAL = int(1e8)   # nnU-Net's bound on sampled foreground voxels
FINGERPRINT_SEED = 1234
FINGERPRINT_PERCENTILES = (0.5, 99.5)

# --- splits ----------------------------------------------------------------------------------------
NUM_FOLDS = 5
SPLIT_SEED = 12345

# --- file names ------------------------------------------------------------------------------------
DATASET_JSON = "dataset.json"
FINGERPRINT_JSON = "dataset_fingerprint.json"
DEFAULT_PLANS_IDENTIFIER = "nnsynthPlans"
SPLITS_JSON = "splits_final.json"
DEMO_TRUTH_FOLDER = "imagesTs_truth"

# --- demo dataset (nnsynth_make_demo_dataset; nnsynth/dataset/demo) --------------------------------
DEMO_DATASET_ID = 501
DEMO_DATASET_NAME = "BrainDemo"
DEMO_NUM_CASES = 24
DEMO_NUM_TEST_CASES = 8
DEMO_SPACING = 2.0                      # mm, isotropic
DEMO_SEQUENCES = ("T1", "T1Gd", "T2", "Flair")
DEMO_MISSING_RATE = 0.25
DEMO_SEED = 12345
DEMO_LABELS = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
DEMO_TUMOUR_PROBABILITY = 0.85          # fraction of subjects with a tumour
DEMO_MIN_SEQUENCES_PER_CASE = 2         # a training case keeps at least this many sequences
DEMO_MONTAGE = "montage.png"
DEMO_LABELS_TS_FOLDER = "labelsTs"
