"""Adaptive verify widths for DFLARE inside SGLang: the mode, the cost table, and the step's pure tensor math.

``DFLARE_VERIFY`` picks the mode: ``static`` (the default: the whole block every step, SGLang's DFlash step)
or ``adaptive`` (each step the verify-width policy of ``sglang_ext.dflare.verify_policy`` chooses per request
how many drafts the target verifies, or a plain decode step). Adaptive needs an attention backend SGLang
0.5.17 captures CUDA graphs for ragged verifies with (``fa3``, ``trtllm_mha``). It stays opt-in while the
load benchmark shows it behind block 8 from batch 32 up (docs/benchmarks.md).

Adaptive runs SGLang's compact ragged verify (``SGLANG_RAGGED_VERIFY_MODE=compact``: target verify graphs
captured per token count, every verify forward carrying per-request lengths); the launcher sets it, so the
scheduler processes inherit it.

The policy needs measured step costs for the card, model and block: ``DFLARE_COST_TABLE=<json>`` (a
:class:`StepCostModel` dump), else a shipped table in ``cost_tables/`` whose file name is the card's name
(``torch.cuda.get_device_name``, lower case, non-alphanumerics as ``-``) and ``_b<block>.json``. Without one
the worker verifies the whole block (static widths through the same ragged path) and says so at start.
``tests/gpu/make_cost_table.py`` writes a table from the load benchmark's rows.

``DFLARE_DRAFT_BLOCKS=<b>[,<b>...]`` (adaptive only, opt-in): shorter blocks the policy may ask the drafter
to draft when their cheaper draft pays (at large batches: the policy then verifies about half the block
anyway). SGLang captures the drafter's CUDA graphs at the configured block only, so a shorter draft runs
eagerly, as a ragged batch of equal lengths (the attention backends that run adaptive verify read a
ragged layout in eager forwards too). Their draft costs come from the cost table, or from the shipped
tables of those blocks; a block without any is dropped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sglang_ext.dflare.verify_policy import StepCostModel

logger = logging.getLogger(__name__)

MODE_ENV = "DFLARE_VERIFY"
COST_TABLE_ENV = "DFLARE_COST_TABLE"
DRAFT_BLOCKS_ENV = "DFLARE_DRAFT_BLOCKS"
RAGGED_MODE_ENV = "SGLANG_RAGGED_VERIFY_MODE"
MODES = ("static", "adaptive", "dspark_planner")  # dspark_planner: the comparison of dspark_planner.py
RAGGED_MODES = ("adaptive", "dspark_planner")  # the modes that run the adaptive step (ragged verify)
RAGGED_GRAPH_BACKENDS = ("fa3", "trtllm_mha")  # SGLang 0.5.17 backends with supports_ragged_verify_graph
SHIPPED_TABLES = Path(__file__).resolve().parent / "cost_tables"


class AdaptiveConfigError(ValueError):
    """``DFLARE_VERIFY`` or ``SGLANG_RAGGED_VERIFY_MODE`` asks for something that cannot run."""


def resolve_mode(attention_backend: str | None, environ: dict[str, str] | None = None) -> str:
    """``adaptive`` or ``static`` for a server on ``attention_backend`` (see the module docstring)."""
    env = os.environ if environ is None else environ
    mode = env.get(MODE_ENV, "static").strip().lower() or "static"
    if mode not in MODES:
        raise AdaptiveConfigError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    ragged_graphs = (attention_backend or "") in RAGGED_GRAPH_BACKENDS
    if mode in RAGGED_MODES and not ragged_graphs:
        raise AdaptiveConfigError(
            f"{MODE_ENV}={mode} needs an attention backend with ragged-verify CUDA graphs "
            f"({', '.join(RAGGED_GRAPH_BACKENDS)}), got --attention-backend {attention_backend!r}"
        )
    ragged = env.get(RAGGED_MODE_ENV, "static")
    if mode in RAGGED_MODES and ragged not in ("static", "compact"):
        raise AdaptiveConfigError(f"{MODE_ENV}={mode} runs {RAGGED_MODE_ENV}=compact, not {ragged!r}")
    if mode == "static" and ragged != "static":
        raise AdaptiveConfigError(f"{RAGGED_MODE_ENV}={ragged!r} needs {MODE_ENV}=adaptive (DFLARE)")
    if env.get(DRAFT_BLOCKS_ENV, "").strip() and mode != "adaptive":
        raise AdaptiveConfigError(f"{DRAFT_BLOCKS_ENV} needs {MODE_ENV}=adaptive, got {mode}")
    draft_blocks(None, env)  # its syntax, at launch
    return mode


def draft_blocks(block: int | None, environ: dict[str, str] | None = None) -> list[int]:
    """The shorter draft blocks of ``DFLARE_DRAFT_BLOCKS`` (sorted; [] when unset), each in 2..block-1
    (``block`` None: only the syntax is checked)."""
    env = os.environ if environ is None else environ
    text = env.get(DRAFT_BLOCKS_ENV, "").strip()
    if not text:
        return []
    try:
        blocks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        message = f"{DRAFT_BLOCKS_ENV}={text!r}: expected block sizes like 8 or 4,8"
        raise AdaptiveConfigError(message) from None
    top = "block - 1" if block is None else str(block - 1)
    if not blocks or blocks[0] < 2 or (block is not None and blocks[-1] >= block):
        raise AdaptiveConfigError(f"{DRAFT_BLOCKS_ENV}={text!r}: each block must be in 2..{top}")
    return blocks


def check_parallelism(server_args: Any) -> None:
    """Adaptive verify runs with tensor parallelism: the TP group's rank 0 plans every step and the other
    ranks run its plan (plan_broadcast.py), the confidences combine the LM head's vocab shards
    (vocab_parallel.py). Pipeline and data parallelism stay refused, neither handled nor tested: each
    pipeline stage has its own TP group and only the last holds the LM head, and under DP attention the LM
    head may be split over the attention-TP group rather than the TP group."""
    for flag, value in (
        ("--pp-size", getattr(server_args, "pp_size", 1)),
        ("--dp-size", getattr(server_args, "dp_size", 1)),
    ):
        if int(value or 1) > 1:
            raise AdaptiveConfigError(
                f"{MODE_ENV}=adaptive runs on one GPU or one tensor-parallel group (--tp-size) per engine, "
                f"got {flag} {value}"
            )


def apply_mode(server_args: Any) -> str:
    """In the launcher (``handle_server_args``): resolve the mode and export it (and the ragged verify
    mode SGLang's graph runner reads) to the scheduler processes."""
    mode = resolve_mode(getattr(server_args, "attention_backend", None))
    if mode in RAGGED_MODES:
        check_parallelism(server_args)
    os.environ[MODE_ENV] = mode
    if mode in RAGGED_MODES:
        os.environ[RAGGED_MODE_ENV] = "compact"
    logger.info("DFLARE verify mode: %s (attention backend %s)", mode, server_args.attention_backend)
    return mode


def ragged_mode() -> str | None:
    """In a scheduler process, after :func:`apply_mode` ran in the launcher: the mode that runs the adaptive
    step (``adaptive`` or ``dspark_planner``), or None for the static block."""
    mode = os.environ.get(MODE_ENV)
    return mode if mode in RAGGED_MODES and os.environ.get(RAGGED_MODE_ENV) == "compact" else None


def card_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (the shipped tables' file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def find_cost_table(card: str, block: int, environ: dict[str, str] | None = None) -> Path | None:
    """The table to use: ``DFLARE_COST_TABLE`` (must exist), else the shipped one for card and block."""
    env = os.environ if environ is None else environ
    explicit = env.get(COST_TABLE_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise AdaptiveConfigError(f"{COST_TABLE_ENV}={explicit}: no such file")
        return path
    shipped = SHIPPED_TABLES / f"{card_slug(card)}_b{block}.json"
    return shipped if shipped.is_file() else None


def with_draft_costs(data: dict[str, Any], tables: Sequence[Path]) -> dict[str, Any]:
    """Cost-table ``data`` with the draft points of ``tables`` it has no (batch, block) point of."""
    have = {(p["batch"], p["block"]) for p in data["draft"]}
    merged = dict(data, draft=list(data["draft"]))
    for path in tables:
        points = json.loads(Path(path).read_text())["draft"]
        extra = [p for p in points if (p["batch"], p["block"]) not in have]
        merged["draft"] += extra
        have |= {(p["batch"], p["block"]) for p in extra}
    return merged


def load_cost_table(
    card: str, block: int, shorter: Sequence[int] = ()
) -> tuple[StepCostModel | None, list[int]]:
    """The step costs for ``card`` and ``block`` (None without a table), and which of the ``shorter`` draft
    blocks have draft costs: the table's own, else a table of that block beside it (``make_cost_table``
    names them ``<card>_b<block>.json``, so a table made on another card brings that card's draft costs),
    else the shipped table of this card and that block."""
    path = find_cost_table(card, block)
    if path is None:
        logger.warning(
            "DFLARE adaptive: no step-cost table for %r block %d (set %s, see docs/sglang_plugin.md); "
            "verifying the whole block every step",
            card,
            block,
            COST_TABLE_ENV,
        )
        return None, []
    data = json.loads(path.read_text())
    suffix = f"_b{block}.json"
    beside = [path.with_name(path.name.removesuffix(suffix) + f"_b{b}.json") for b in shorter]
    shipped = [SHIPPED_TABLES / f"{card_slug(card)}_b{b}.json" for b in shorter]
    sources = [*beside, *shipped] if path.name.endswith(suffix) else shipped
    data = with_draft_costs(data, [p for p in sources if p.is_file()])
    costed = {p["block"] for p in data["draft"]}
    usable = [b for b in shorter if b in costed]
    if len(usable) < len(shorter):
        logger.warning(
            "DFLARE adaptive: no draft cost for blocks %s in %s, beside it or in the shipped tables; "
            "drafting only %s",
            sorted(set(shorter) - set(usable)),
            path,
            [*usable, block],
        )
    cost = StepCostModel.from_dict(data)
    if cost.block_size and cost.block_size != block:
        logger.warning("DFLARE adaptive: %s is for block %d, serving %d", path, cost.block_size, block)
    logger.info("DFLARE adaptive: step costs from %s (measured on %s, %s)", path, cost.device, cost.model)
    if usable:
        logger.info("DFLARE adaptive: the policy may draft blocks %s", usable)
    return cost, usable


# ---- the step's tensor math (device-agnostic, tested on the CPU) -----------------------------------------


def windowed_greedy_accept(
    candidates: torch.Tensor, target_predict: torch.Tensor, verify_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy accept within each request's verify window.

    ``candidates`` [bs, B]: column 0 the last committed token, columns 1.. the drafts; ``target_predict``
    [bs, B]: the target's argmax after each column (columns at or past a row's window hold garbage);
    ``verify_lens`` [bs]: columns the target verified (1 = only the committed token: a plain decode of that
    row). Draft j is accepted while every draft before it was and it equals the target's token, and only
    inside the window, so the bonus (the target's token after the accepted prefix) always comes from a
    verified column. Returns (accepted drafts int32 [bs], bonus int64 [bs])."""
    bs, block = candidates.shape
    if target_predict.shape != (bs, block) or verify_lens.shape != (bs,):
        raise ValueError("candidates, target_predict [bs, B] and verify_lens [bs] disagree")
    drafts = torch.arange(block - 1, device=candidates.device)
    inside = drafts[None, :] < (verify_lens.to(drafts.dtype) - 1)[:, None]
    match = (candidates[:, 1:] == target_predict[:, :-1]) & inside
    accepted = match.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
    bonus = target_predict.gather(1, accepted.to(torch.int64)[:, None]).squeeze(1).to(torch.int64)
    return accepted, bonus


def committable_columns(
    hidden: torch.Tensor, cache_loc_2d: torch.Tensor, positions_2d: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``window`` columns of each request's block: hidden rows [bs * window, D], cache slots and
    positions [bs, window] (contiguous), from ``hidden`` [bs * B, D] and [bs, B] slots and positions.

    After a verify only each request's accepted drafts and bonus (``commit_lens``, at most its window) go
    into the drafter's context K/V, so columns past the longest window need no context K/V projection: a
    block-8 server that drafted block 4 projected 8 rows per request for at most 4 committed (1.17 against
    static block 4's 0.62 ms at batch 256 on an H100), a plain decode step 8 for 1."""
    bs, block = cache_loc_2d.shape
    if window >= block:
        return hidden, cache_loc_2d, positions_2d
    if window < 1:
        raise ValueError(f"a verify window holds at least the committed token, got {window}")
    rows = hidden.view(bs, block, -1)[:, :window].reshape(bs * window, -1)
    return rows, cache_loc_2d[:, :window].contiguous(), positions_2d[:, :window].contiguous()


def needs_logit_adjustments(sampling_info: Any) -> bool:
    """Whether SGLang's verify adjustments (custom logit processors, penalties, a grammar mask, logit bias)
    change this batch's logits. They work on the strided [bs * B] rows, so only then must a greedy step
    scatter the whole compact verify logits to that layout before its argmax."""
    if sampling_info is None:
        return False
    penalizer = getattr(sampling_info, "penalizer_orchestrator", None)
    return bool(
        getattr(sampling_info, "has_custom_logit_processor", False)
        or (penalizer is not None and penalizer.is_required)
        or getattr(sampling_info, "acc_linear_penalties", None) is not None
        or getattr(sampling_info, "grammar_mask", None) is not None
        or getattr(sampling_info, "logit_bias", None) is not None
    )


def strided_argmax(compact_logits: torch.Tensor, layout: Any, block: int) -> torch.Tensor:
    """The target's argmax [bs, B] in the strided layout (0 past each row's window) from the compact ragged
    verify's logits [tokens, V]: the argmax of the compact rows, scattered. Scattering the logits first, as
    SGLang's DSPARK step does, writes bs * B vocabulary rows and reads them again: at batch 128, block 16
    about 1.2 GB of float32 each way for about 1,000 verified rows."""
    from sglang.kernels.ops.speculative.dspark.dspark_verify_window import ScatterCompactToStrided

    ids = compact_logits[: layout.graph_num_tokens].argmax(dim=-1, keepdim=True)
    strided = ScatterCompactToStrided.execute(
        compact=ids, layout=layout, fill_value=0, verify_num_draft_tokens=block
    )
    return strided.view(-1, block)


def window_inputs(block_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors source, drafts) for SGLang's ragged window builder from [bs, B] block tokens (column 0 the
    last committed token): it reads the drafts alone ([bs, B - 1]) and each anchor from column 0 of a tensor
    with the drafts' row stride (its Triton kernel indexes both with one stride)."""
    return block_tokens[:, :-1].contiguous(), block_tokens[:, 1:].contiguous()


def out_tokens(candidates: torch.Tensor, accepted: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """[bs, B] tokens the scheduler appends (it reads the first accepted + 1 of each row): the accepted
    drafts, then the bonus token."""
    bs, block = candidates.shape
    out = torch.zeros((bs, block), dtype=torch.int64, device=candidates.device)
    if block > 1:
        out[:, : block - 1].copy_(candidates[:, 1:])
    out.scatter_(1, accepted.to(torch.int64)[:, None], bonus.to(torch.int64)[:, None])
    return out


def top1_probabilities(hidden: torch.Tensor, weight: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The drafter's top-1 probability per row of ``hidden`` [n, H] under the whole LM head ``weight``
    [V, H] (float32 [n]): the confidences the policy reads, in chunks so no [n, V] logits live at once.
    SGLang's head, padded and possibly split over TP ranks: ``vocab_parallel.lm_head_top1_probabilities``."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = torch.matmul(hidden[start : start + chunk].to(weight.dtype), weight.T).float()
        out[start : start + chunk] = torch.exp(logits.max(dim=-1).values - torch.logsumexp(logits, dim=-1))
    return out


def uniform_width(widths: list[int], minimum: int = 1) -> int:
    """One width for a batch that must verify alike (sampling: SGLang's sampling verify takes one window for
    the batch): the mean of the policy's widths, rounded, at least ``minimum``."""
    return max(minimum, round(sum(widths) / len(widths))) if widths else minimum
