"""The session side of gpupool: what runs inside a remote or local session (standard library only).

The scheduler and a session agree on one contract, written once in ``gpupool.session.contract``.
"""
