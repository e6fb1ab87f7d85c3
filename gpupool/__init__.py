"""gpupool: one training experiment across free GPU sessions (Colab, Kaggle, local).

Importing gpupool loads neither torch nor any provider SDK.
"""

__version__ = "0.1.0"
