"""Adapters for training frameworks that run their own loop and write their own checkpoints.

Each module is imported only when the training script imports it, so ``import gpupool`` stays
light (no torch, transformers or lightning):

- ``gpupool.integrations.transformers``: ``GpupoolCallback`` for the Hugging Face ``Trainer``
  and ``resume_from_checkpoint()``.
- ``gpupool.integrations.lightning``: ``GpupoolCallback`` for the Lightning ``Trainer`` (it also
  saves the RNG states Lightning's checkpoint leaves out) and ``ckpt_path()``.

Both work with a checkpoint folder declared in the experiment file (``checkpoint.path``): the
session's supervisor restores it into place before the script starts and snapshots it into the
checkpoint store after every save the callback reports (``Session.request_snapshot()``).
"""
