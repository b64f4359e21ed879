"""A draft vocabulary: the target tokens a drafter may propose, the most frequent ones of the target's output.

Why: a DFlare drafter has no LM head of its own; it borrows the target's. At batch 1 a draft forward mostly
reads weights, and the head is a large share of them: on Qwen3-8B shapes the head is 151,936 x 4,096 (1.2 GB
in bf16) next to 2.7 GB for seven draft layers, while a whole target step reads about 16 GB. Drafting over
the 32,768 most frequent tokens reads a fifth of that head (EAGLE-3 drafts over such a subset too). At large
batches the head is matrix work instead (rows x vocab x hidden per step), cut by the same factor.

What it costs: a token outside the subset is never drafted, so a draft whose right answer lies outside is
rejected, and every draft after it in the block with it; acceptance falls as ``coverage`` (the subset's
share of the target's tokens) falls, and faster (on the demo pair 94 % coverage kept 96 % of greedy tau,
99 % kept all of it: docs/benchmarks.md). Output never changes: the target verifies every draft, and
drafts are the drafter's argmax (a deterministic proposal), so greedy and sampled decoding stay exact.

Stored as ``draft_vocab.json`` in the drafter's checkpoint directory, where the reference engine and the
SGLang plugin find it. ``ids`` are kept sorted: an argmax over the subset then breaks ties by the lowest
target id, as an argmax over the whole head does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

FILE = "draft_vocab.json"
FORMAT = "dflare-draft-vocab"


class DraftVocabError(ValueError):
    """A draft vocabulary file that does not fit its target."""


@dataclass(frozen=True)
class DraftVocab:
    """Target token ids the drafter may propose (int64, sorted, unique) and how much of the counted text
    they cover (None when not built from counts)."""

    ids: torch.Tensor
    target_vocab_size: int
    coverage: float | None = None

    def __post_init__(self) -> None:
        ids = self.ids
        if ids.ndim != 1 or ids.numel() == 0 or ids.dtype != torch.int64:
            raise DraftVocabError("a draft vocabulary needs a non-empty 1-D int64 tensor of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.target_vocab_size:
            raise DraftVocabError(f"draft vocabulary ids must lie in [0, {self.target_vocab_size})")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise DraftVocabError("draft vocabulary ids must be sorted and unique")

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    @classmethod
    def from_counts(cls, counts: torch.Tensor, size: int, always: Iterable[int] = ()) -> DraftVocab:
        """The ``size`` most counted ids of ``counts`` [V] (ties: the lower id), ``always`` among them
        (end-of-sequence ids: a drafter that cannot draft the end rejects every block that holds it)."""
        vocab = int(counts.numel())
        if not 1 <= size <= vocab:
            raise DraftVocabError(f"draft vocabulary size {size} outside [1, {vocab}]")
        forced = sorted({int(i) for i in always})
        if any(not 0 <= i < vocab for i in forced) or len(forced) > size:
            raise DraftVocabError(f"forced ids {forced} do not fit a draft vocabulary of {size} in {vocab}")
        score = counts.to(torch.float64).clone()
        score[forced] = float("inf")
        # stable sort on -score: equal counts keep id order, so ties go to the lower id
        order = torch.sort(-score, stable=True).indices[:size]
        ids = torch.sort(order).values.to(torch.int64)
        seen = float(counts.sum())
        coverage = float(counts.to(torch.float64)[ids].sum()) / seen if seen > 0 else None
        return cls(ids, vocab, coverage)

    def check_target(self, vocab_size: int) -> None:
        """Refuse a vocabulary counted for another target (its ids would name other tokens)."""
        if self.target_vocab_size != vocab_size:
            raise DraftVocabError(
                f"draft vocabulary made for a {self.target_vocab_size}-token target, this target has "
                f"{vocab_size}: rebuild it with `dflare draft-vocab`"
            )

    def head(self, weight: torch.Tensor) -> torch.Tensor:
        """The subset's rows of an LM-head weight [V, H] (a contiguous copy: one small product per draft)."""
        if int(weight.shape[0]) < self.target_vocab_size:
            raise DraftVocabError(
                f"LM head of {int(weight.shape[0])} rows for a draft vocabulary of a {self.target_vocab_size}"
                "-token target"
            )
        return weight.index_select(0, self.ids.to(weight.device)).contiguous()

    def shard(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(local rows, target ids) of the subset inside a vocab shard ``[start, start + count)``, as an LM
        head split over tensor-parallel ranks holds it. A shard holding none of the subset keeps its first
        token: every rank then takes part in the cross-rank argmax, and the larger set stays exact."""
        inside = self.ids[(self.ids >= start) & (self.ids < start + count)]
        if inside.numel() == 0:
            inside = torch.tensor([start], dtype=torch.int64)
        return inside - start, inside

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "target_vocab_size": self.target_vocab_size,
            "size": self.size,
            "coverage": self.coverage,
            "ids": self.ids.tolist(),
        }

    def save(self, directory: str | Path) -> Path:
        """``draft_vocab.json`` in a checkpoint directory, where the loaders look."""
        return self.write(Path(directory) / FILE)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> DraftVocab | None:
        """The draft vocabulary of a checkpoint directory, or None when it has none."""
        path = Path(directory) / FILE
        return cls.read(path) if path.is_file() else None

    @classmethod
    def read(cls, path: str | Path) -> DraftVocab:
        """A draft vocabulary file (one named by configuration: a missing file is an error)."""
        path = Path(path)
        if not path.is_file():
            raise DraftVocabError(f"{path}: no draft vocabulary file there")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise DraftVocabError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
            return cls(
                torch.tensor(raw["ids"], dtype=torch.int64),
                int(raw["target_vocab_size"]),
                raw.get("coverage"),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise DraftVocabError(f"{path}: not a draft vocabulary file ({exc})") from exc


def count_tokens(
    sequences: Iterable[Iterable[int]], vocab_size: int, into: torch.Tensor | None = None
) -> torch.Tensor:
    """How often each id [vocab_size] occurs in ``sequences``, added to ``into`` when given (no tensor of the
    vocabulary's size per sequence: a corpus has many short ones); ids outside the vocab are an error."""
    counts = into if into is not None else torch.zeros(vocab_size, dtype=torch.int64)
    for seq in sequences:
        ids = torch.as_tensor(list(seq), dtype=torch.int64)
        if ids.numel() == 0:
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise DraftVocabError(f"token id outside the {vocab_size}-token vocabulary")
        counts.index_add_(0, ids, torch.ones_like(ids))
    return counts
