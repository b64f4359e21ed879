"""SGLang 0.5.17 plugin: ``--speculative-algorithm DFLARE`` and ``usage.speculative`` on OpenAI endpoints.

Loaded by SGLang in every process through the ``sglang.srt.plugins`` entry point ``dflare`` (installed
with this package). ``register`` must stay cheap: it also runs in processes that never speculate.
SGLang swallows plugin exceptions, so failures are logged loudly here and surface later as
``Unknown speculative algorithm name: DFLARE``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Entry point: register the DFLARE algorithm, the draft architecture, the ``dflare`` warm-up and the
    hooks (launch validation, OpenAI usage, the per-request step counters in meta_info)."""
    global _registered
    if _registered:
        return
    try:
        from sglang.srt.models.registry import ModelRegistry
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from sglang_ext.sglang_plugin import openai_usage, phase_timing, request_counters, validation, warmup
        from sglang_ext.sglang_plugin.algorithm import register_algorithm
        from sglang_ext.sglang_plugin.model import DFlareDraftModel

        register_algorithm()
        warmup.register()  # --warmups dflare
        ModelRegistry.models[validation.ARCHITECTURE] = DFlareDraftModel
        # queued here, applied by SGLang's load_plugins() once every plugin has run
        timing = phase_timing.HOOKS if phase_timing.enabled() else ()
        hooks = (*validation.HOOKS, *openai_usage.HOOKS, *request_counters.HOOKS, *timing)
        for target, hook, kind in hooks:
            HookRegistry.register(target, hook, HookType[kind])
    except Exception:
        logger.exception("dflare SGLang plugin failed to register: DFLARE will be unavailable")
        raise
    _registered = True
    logger.info("dflare SGLang plugin registered: algorithm DFLARE, architecture QwenDFlareDraftModel")
