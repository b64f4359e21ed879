"""The processes of a tensor-parallel adaptive step on CPU (gloo): LM-head confidences and one shared plan.

``python -m tests.plugin.tp_plan_ranks INPUTS OUT TP_SIZES PORTS``: imports SGLang once, then for each TP
size (comma-separated, one rendezvous port each) forks that many rank processes (so SGLang is imported
once, not once per rank). Each rank joins SGLang's gloo process group and model-parallel state, then

* builds SGLang's ``ParallelLMHead`` for every head in ``INPUTS`` (its own vocab shard, loaded through
  SGLang's weight loader; LoRA-added rows placed by SGLang's shard indices), writes a large value into
  every padding row (a head that counted padding would get other probabilities), and computes
  ``vocab_parallel.lm_head_top1_probabilities`` of the shared hidden states;
* plans a sequence of steps with ``AdaptiveStep``'s agreement (``_agreed_start``: plain step and draft
  block, ``_agreed_widths``) from its own confidences and its own cost table (its shorter draft blocks:
  those the table has draft costs for), in each scenario of the inputs.

Results go to ``OUT/tp{size}-rank{rank}.pt``; the exit status is non-zero if any rank failed or hung.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

PADDING_VALUE = 5.0
RANK_TIMEOUT_S = 60


def _head(case: dict) -> tuple[torch.nn.Module, int]:
    """This rank's ``ParallelLMHead`` of ``case['weight']`` [vocab, H] (the first ``org`` rows the base
    vocab, the rest LoRA-added rows), its padding rows poisoned; and how many padding rows it has."""
    from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead

    weight, org = case["weight"], case["org"]
    head = ParallelLMHead(
        weight.shape[0], weight.shape[1], org_num_embeddings=org, params_dtype=torch.float32
    )
    shard = head.shard_indices
    with torch.no_grad():
        head.weight_loader(head.weight, weight[:org])  # SGLang's loader: this shard's base rows, zeros after
        head.weight[shard.num_org_elements :].fill_(PADDING_VALUE)
        added_at = shard.num_org_elements_padded
        added = weight[shard.added_vocab_start_index : shard.added_vocab_end_index]
        head.weight[added_at : added_at + added.shape[0]].copy_(added)
    padding = shard.num_org_vocab_padding + shard.num_added_vocab_padding
    return head, padding


def _confident_sampler(inputs: dict, draft_vocab: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft graph's confident greedy head on this rank's shard of the first head (no added rows):
    (draft ids, top-1 probabilities) of the drafted positions of ``inputs['draft_hidden']``. SGLang's
    TP group runs ``all_gather_into_tensor`` as a CUDA-only custom op, so the head gets the same
    collective of the group's gloo process group."""
    from sglang.srt.distributed import get_tp_group

    from sglang_ext.sglang_plugin.confident_sampler import ConfidentDraftSampler

    head, _ = _head(inputs["heads"][0])
    shard = head.shard_indices
    tp = get_tp_group()

    def gather(out: torch.Tensor, tensor: torch.Tensor) -> None:
        torch.distributed.all_gather_into_tensor(out, tensor, group=tp.device_group)

    group = SimpleNamespace(world_size=tp.world_size, all_gather_into_tensor=gather)
    sampler = ConfidentDraftSampler(
        weight=head.weight.data,
        block_size=inputs["block"],
        num_org=int(shard.num_org_elements),
        org_vocab_start=int(shard.org_vocab_start_index),
        max_tokens=64,
        tp_group=group if group.world_size > 1 else None,
    )
    if draft_vocab:  # the same head kept to a draft vocabulary: each rank its shard's rows of it
        from sglang_ext.dflare.draft_vocab import DraftVocab

        vocab = DraftVocab(inputs["draft_vocab"], int(inputs["heads"][0]["weight"].shape[0]))
        sampler = ConfidentDraftSampler.over_draft_vocab(sampler, vocab)
    hidden = inputs["draft_hidden"]
    sampler(hidden)
    n = hidden.shape[0] // inputs["block"] * (inputs["block"] - 1)
    return sampler.out[:n].clone(), sampler.top1[:n].clone()


def shorter_blocks(cost: dict | None, block: int) -> list[int]:
    """The draft blocks shorter than ``block`` that a cost table has draft costs for."""
    return sorted({p["block"] for p in cost["draft"]} - {block}) if cost else []


def _plans(inputs: dict, rank: int, tp_size: int) -> dict:
    """Each scenario's per-step (plain, drafted block, widths) on this rank, from this rank's own inputs."""
    from sglang_ext.dflare.verify_policy import StepCostModel
    from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep
    from sglang_ext.sglang_plugin.plan_broadcast import PlanBroadcast

    worker = SimpleNamespace(block_size=inputs["block"])
    out = {}
    for name, costs in inputs["costs"].items():
        cost = costs[rank % len(costs)]
        step = AdaptiveStep(
            worker,
            None if cost is None else StepCostModel.from_dict(cost),
            share=PlanBroadcast.for_tp_group(),
            draft_blocks=shorter_blocks(cost, inputs["block"]),
        )
        plans = []
        for (bs, greedy), confidences in zip(inputs["schedule"], inputs["confidences"][rank], strict=True):
            plain, drafted = step._agreed_start(greedy, bs)
            widths = [0] * bs if plain else step._agreed_widths(confidences[:, : drafted - 1], greedy, bs)
            plans.append((plain, drafted, widths))
        out[name] = {"planned": step.planned, "leads": step.leads, "plans": plans}
    return out


def _rank(rank: int, tp_size: int, port: int, inputs_path: str, out: str) -> None:
    try:
        from sglang.srt.distributed import destroy_distributed_environment, destroy_model_parallel

        from sglang_ext.sglang_plugin import vocab_parallel
        from tests.plugin.tp_rank import join_gloo_tp_group

        torch.set_num_threads(1)
        inputs = torch.load(inputs_path)
        join_gloo_tp_group(rank, tp_size, port)
        probabilities, padding = [], []
        for case in inputs["heads"]:
            head, pad = _head(case)
            probabilities.append(vocab_parallel.lm_head_top1_probabilities(case["hidden"], head, chunk=5))
            padding.append(pad)
        result = {"probabilities": probabilities, "padding": padding, **_plans(inputs, rank, tp_size)}
        result["sampler"] = _confident_sampler(inputs)
        result["sampler_draft_vocab"] = _confident_sampler(inputs, draft_vocab=True)
        torch.save(result, Path(out) / f"tp{tp_size}-rank{rank}.pt")
        torch.distributed.barrier()
        destroy_model_parallel()
        destroy_distributed_environment()
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


def main(inputs: str, out: str, tp_sizes: list[int], ports: list[int]) -> int:
    # imported once, before the fork: every rank starts with them loaded
    import sglang.srt.distributed
    import sglang.srt.layers.vocab_parallel_embedding  # noqa: F401

    import sglang_ext.sglang_plugin.adaptive_step  # noqa: F401

    torch.set_num_threads(1)
    fork = multiprocessing.get_context("fork")
    for tp_size, port in zip(tp_sizes, ports, strict=True):
        procs = [fork.Process(target=_rank, args=(r, tp_size, port, inputs, out)) for r in range(tp_size)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + RANK_TIMEOUT_S
        for proc in procs:  # one failed rank leaves its peers waiting in a collective: the deadline ends them
            proc.join(max(0.0, deadline - time.monotonic()))
        failed = [r for r, proc in enumerate(procs) if proc.exitcode != 0]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        if failed:
            print(f"TP {tp_size}: ranks {failed} failed or hung", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sizes, ports = ([int(x) for x in arg.split(",")] for arg in sys.argv[3:5])
    sys.exit(main(sys.argv[1], sys.argv[2], sizes, ports))
