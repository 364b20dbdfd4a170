"""Networks: HyperConv (code-conditioned convolution), shared blocks, the Seq2Seq encoder/HyperDecoder."""
from nnsynth.networks.blocks import count_parameters
from nnsynth.networks.hyperconv import HyperConv
from nnsynth.networks.seq2seq import (DEFAULT_SEQ2SEQ_NETWORK, Encoder, HyperDecoder, Seq2SeqNet,
                                      estimate_feature_map_voxels, resolve_network_config)

__all__ = ["HyperConv", "Seq2SeqNet", "Encoder", "HyperDecoder", "DEFAULT_SEQ2SEQ_NETWORK", "count_parameters",
           "estimate_feature_map_voxels", "resolve_network_config"]
