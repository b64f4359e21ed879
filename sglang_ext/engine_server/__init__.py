"""``dflare engine-server``: the reference engine behind SGLang's HTTP protocol.

Also home of the pieces the gateway's embedded backend shares with it (``runner``, ``serving``,
``protocol``); nothing here imports torch at import time.
"""
