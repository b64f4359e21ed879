"""Text statistics reported next to acceptance: a target that loops would make drafting look easy."""

from __future__ import annotations

from collections.abc import Sequence


def distinct_ngram_ratio(seqs: Sequence[Sequence[int]], n: int = 4) -> dict[str, float]:
    """Distinct n-grams / n-grams: ``mean`` over outputs (a looping output scores low) and ``pooled``.

    Outputs shorter than ``n`` tokens are skipped.
    """
    per_output, pooled, total = [], set(), 0
    for seq in seqs:
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        if not grams:
            continue
        per_output.append(len(set(grams)) / len(grams))
        pooled.update(grams)
        total += len(grams)
    mean = sum(per_output) / len(per_output) if per_output else 0.0
    return {"mean": mean, "pooled": len(pooled) / total if total else 0.0, "outputs": len(per_output)}
