"""Loopback emulators of remote services, speaking their real wire protocols.

The real client libraries (kagglesdk, kaggle) talk to them over 127.0.0.1, so tests need no network.
"""
