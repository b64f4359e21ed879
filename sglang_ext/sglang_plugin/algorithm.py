"""``--speculative-algorithm DFLARE``: a ``CustomSpecAlgo`` that takes every DFlash branch of SGLang 0.5.17.

SGLang dispatches on ``is_dflash_family()`` for target hidden-state capture, KV sizing, decode
preparation and CUDA graphs, so answering like DFLASH reuses all of it (docs/sglang_plugin.md,
"SGLang 0.5.17 facts the plugin relies on").
"""

from __future__ import annotations

import logging
from typing import Any

from sglang.srt.speculative.spec_registry import CustomSpecAlgo

from sglang_ext.sglang_plugin.validation import validate_server_args

logger = logging.getLogger(__name__)

ALGORITHM = "DFLARE"


class DFlareAlgo(CustomSpecAlgo):
    """Answers like DFLASH, plus the three methods SGLang 0.5.17 calls but ``CustomSpecAlgo`` lacks."""

    def is_dflash_family(self) -> bool:
        return True

    def is_dflash(self) -> bool:
        return True

    def is_dspark(self) -> bool:
        return False

    def supports_target_verify_for_draft(self) -> bool:
        return True  # the draft runner captures TARGET_VERIFY graphs, as DFLASH's does

    def supports_grammar_overlap(self) -> bool:
        return True

    def supports_ragged_verify(self) -> bool:
        """True in adaptive (or dspark_planner) mode: SGLang's target graph runner then captures ragged-verify
        graphs by token count, and every DFLARE verify carries per-request lengths (adaptive_step.py)."""
        from sglang_ext.sglang_plugin.adaptive import ragged_mode

        return ragged_mode() is not None

    def has_draft_kv(self) -> bool:
        return True

    # -- missing from CustomSpecAlgo in 0.5.17 (scheduler start dies with AttributeError without them)
    def carries_draft_hidden_states(self) -> bool:
        return False

    def need_topk(self) -> bool:
        return False

    def create_future_map(
        self,
        device: Any,
        req_to_token_pool: Any,
        needs_cpu_seq_lens: bool = True,
        needs_confidence_relay: bool = False,
    ) -> Any:
        from sglang.srt.managers.overlap_utils import FutureMap

        return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

    def handle_server_args(self, server_args: Any) -> None:
        """DFlash's argument handling (steps/topk 1, block size, draft attention backend, defaults), then the
        verify mode (adaptive.py), exported to the scheduler processes."""
        from sglang.srt.arg_groups.speculative_hook import _handle_dflash

        from sglang_ext.sglang_plugin.adaptive import apply_mode

        _handle_dflash(server_args)
        apply_mode(server_args)


def worker_factory(server_args: Any) -> type:
    """The class SGLang instantiates as the speculative worker (imported late: it pulls CUDA-side code)."""
    from sglang_ext.sglang_plugin.worker import DFlareWorkerV2

    return DFlareWorkerV2


def register_algorithm() -> bool:
    """Register DFLARE once per process; returns False if it was already registered."""
    from sglang.srt.speculative import spec_registry
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    if spec_registry.get_spec(ALGORITHM) is not None:
        return False
    SpeculativeAlgorithm.register(
        ALGORITHM,
        supports_overlap=True,
        validate_server_args=validate_server_args,
        spec_class=DFlareAlgo,
    )(worker_factory)
    return True
