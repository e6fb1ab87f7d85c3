"""gpupool's provider adapters: local, kaggle and colab (found through entry points)."""
