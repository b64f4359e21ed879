"""Reference speculative engine (CPU or any torch device): the contract in docs/architecture.md."""

from sglang_ext.reference.engine import Request, Result, SpeculativeEngine
from sglang_ext.reference.loader import load_engine
from sglang_ext.reference.sampling import SamplingParams

__all__ = ["Request", "Result", "SamplingParams", "SpeculativeEngine", "load_engine"]
