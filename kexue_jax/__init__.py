"""kexue_jax: the Transformer research of Su Jianlin's 2021 kexue.fm posts as composable JAX functions.

Nothing here touches devices or reads flags at import time.
"""

__version__ = "0.1.0"
