"""The session side of gpupool: what runs inside a remote or local session (standard library only).

- ``contract``: what the scheduler and a session agree on, written once (environment variables,
  session files, exit codes, the deadline rule, event lines, atomic writes, tar extraction).
- ``bootstrap``: the supervisor of the user's command (``python -m gpupool.session.bootstrap``).
- ``snapshot``: checkpoint and output folders of scripts that do not use the runtime.
- ``inputs``: data brought into place and verified before the command runs.

The package ships whole into every session (``gpupool.bundle``), beside the public runtime
(``gpupool.runtime``, ``gpupool.torch``) and the checkpoint format (``gpupool.manifest``).
"""
