"""gpupool's Kaggle Kernels provider (entry point ``kaggle = "gpupool_providers.kaggle:KaggleProvider"``)."""

from .provider import KaggleProvider

__all__ = ["KaggleProvider"]
