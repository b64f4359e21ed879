"""Free loopback ports for test servers, below the ephemeral range.

SGLang-style servers take their internal ports from the ephemeral range (32768 and up), and outgoing
connections do too: a test server listening up there can collide with them.
"""

from __future__ import annotations

import random
import socket


def loopback_port(low: int = 20000, high: int = 32000) -> int:
    """A port in ``[low, high)`` that 127.0.0.1 can bind right now."""
    for port in random.sample(range(low, high), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")
