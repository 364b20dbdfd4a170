"""Evaluation: image metrics (CONTRACT.md section 5 and the papers' profiles)."""
from nnsynth.evaluation.metrics import compute_metrics, lpips_score, mae, normalize_pair, psnr, ssim

__all__ = ["compute_metrics", "normalize_pair", "psnr", "ssim", "mae", "lpips_score"]
