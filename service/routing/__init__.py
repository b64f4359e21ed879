"""Routing across many SGLang backends: pool, discovery, health, circuit breaking, policies, retries.

Imports point downstream: ``routed.RoutedBackend`` wraps single-URL backends (``service/backends``)
and is itself a backend, so the API layer never knows whether it talks to one engine or fifty.
"""
