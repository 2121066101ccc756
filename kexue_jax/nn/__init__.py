"""Pure-function Flax building blocks (kexue.fm/archives/8620, 8475, 8444).

Importing this package does no work: no devices are touched and no flags are read.
"""
from kexue_jax.nn import attention, init, masks, mixers, mup, norms
from kexue_jax.nn.attention import MultiHeadAttention, dot_product_attention, rope
from kexue_jax.nn.norms import LayerNorm, RMSNorm, alpha_schedule
from kexue_jax.nn.mixers import MixerOptions
from kexue_jax.nn.mup import mup_lr_scales
from kexue_jax.nn.transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig", "MultiHeadAttention", "LayerNorm", "RMSNorm",
           "alpha_schedule", "dot_product_attention", "rope", "attention", "init", "masks", "mixers", "mup",
           "mup_lr_scales", "norms", "MixerOptions"]
