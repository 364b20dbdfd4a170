"""Losses: masked L1 and the Seq2Seq eq. 1 loss, LPIPS-style perceptual loss (local weights only), SSIM."""
from nnsynth.losses.perceptual import PerceptualLoss, find_backbone_weights
from nnsynth.losses.reconstruction import Seq2SeqLoss, masked_l1
from nnsynth.losses.ssim import SSIMLoss, ssim, ssim_map

__all__ = ["PerceptualLoss", "find_backbone_weights", "Seq2SeqLoss", "masked_l1", "SSIMLoss", "ssim", "ssim_map"]
