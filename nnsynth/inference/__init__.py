"""Inference: sliding-window synthesis, fold ensembling, export to the case geometry, and the Python API.

``nnsynth.inference.api.SynthesisModel`` is the notebook entry point; ``predictor.predict_folder`` backs
``nnsynth_predict``. Submodules are imported lazily so ``import nnsynth.inference`` stays cheap.
"""
