"""Acceptance traces: what a drafter proposed and what its target accepted, step by step, per request.

A trace lets a serving engine with dummy weights (the SGLang plugin's replay) and a speculation policy see
realistic acceptance: it falls with the draft position and differs per request. Each verify step stores
the drafter's top-1 probability at every draft position (``block_size - 1`` confidences) and how many
drafts the target accepted when it verified the WHOLE block. That is enough to replay any verify window:
a window of ``k`` drafts accepts ``min(accepted, k)`` (:func:`accepted_in_window`), because acceptance is
a prefix, so the first ``k`` positions are accepted exactly as they were with the whole block verified.

On disk: JSON (gzip when the path ends in ``.gz``) with ``"format": "dflare-acceptance-trace/1"``,
requests stored column-wise (``accepted`` list, ``confidences`` rows) and confidences rounded to 4
decimals. Only the standard library is needed to read or write one.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "dflare-acceptance-trace/1"
CONFIDENCE_DECIMALS = 4


class TraceFormatError(ValueError):
    """A trace file or object that does not follow ``dflare-acceptance-trace/1``."""


@dataclass(frozen=True)
class TraceStep:
    """One verify step: ``accepted`` drafts (0..block_size-1, bonus token not counted) of the whole block,
    and the drafter's top-1 probability at each of the block_size-1 draft positions (rounded to 4
    decimals on construction, so a trace in memory equals itself saved and loaded)."""

    accepted: int
    confidences: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.accepted, bool) or not isinstance(self.accepted, int):
            raise TraceFormatError(f"accepted must be an int, got {self.accepted!r}")
        conf = tuple(round(float(c), CONFIDENCE_DECIMALS) for c in self.confidences)
        if not conf:
            raise TraceFormatError("a step needs at least one draft confidence (block_size >= 2)")
        if not all(0.0 <= c <= 1.0 for c in conf):  # also refuses NaN
            raise TraceFormatError(f"confidences must be probabilities in [0, 1], got {conf}")
        if not 0 <= self.accepted <= len(conf):
            raise TraceFormatError(f"accepted={self.accepted} outside 0..{len(conf)} (the drafts of a block)")
        object.__setattr__(self, "confidences", conf)


def accepted_in_window(step: TraceStep, k: int) -> int:
    """Drafts accepted when only the first ``k`` of the step's drafts are verified: ``min(accepted, k)``.

    The trace says position ``j`` is accepted iff ``j < accepted``; a shorter window keeps exactly those of
    its positions (never a block-wide clamp of one length)."""
    if k < 0:
        raise ValueError(f"a verify window has k >= 0 drafts, got {k}")
    return min(step.accepted, k)


@dataclass
class AcceptanceTrace:
    """Verify steps of several requests, recorded (``source="demo"``) or generated (``"synthetic"``)."""

    source: str
    block_size: int
    temperature: float
    requests: list[list[TraceStep]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise TraceFormatError(f"source must be a non-empty string, got {self.source!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise TraceFormatError(f"block_size must be an int >= 2, got {self.block_size!r}")
        temperature = float(self.temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise TraceFormatError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        self.temperature = temperature
        if not isinstance(self.meta, dict):
            raise TraceFormatError(f"meta must be a dict, got {type(self.meta).__name__}")
        drafts = self.block_size - 1
        for r, steps in enumerate(self.requests):
            for i, step in enumerate(steps):
                if not isinstance(step, TraceStep):
                    raise TraceFormatError(f"request {r} step {i}: not a TraceStep ({type(step).__name__})")
                if len(step.confidences) != drafts:
                    raise TraceFormatError(
                        f"request {r} step {i}: {len(step.confidences)} confidences, expected "
                        f"block_size - 1 = {drafts}"
                    )

    @property
    def num_steps(self) -> int:
        return sum(len(steps) for steps in self.requests)

    # ---- files -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "block_size": self.block_size,
            "temperature": self.temperature,
            "meta": self.meta,
            "requests": [
                {"accepted": [s.accepted for s in steps], "confidences": [list(s.confidences) for s in steps]}
                for steps in self.requests
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> AcceptanceTrace:
        """Build and validate a trace from its JSON object; :class:`TraceFormatError` says what is wrong."""
        if not isinstance(data, dict):
            raise TraceFormatError(f"a trace is a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise TraceFormatError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        missing = [k for k in ("source", "block_size", "temperature", "requests") if k not in data]
        if missing:
            raise TraceFormatError(f"missing keys: {', '.join(missing)}")
        if not isinstance(data["requests"], list):
            raise TraceFormatError("requests must be a list")
        requests = []
        for r, req in enumerate(data["requests"]):
            if not isinstance(req, dict) or not {"accepted", "confidences"} <= req.keys():
                raise TraceFormatError(f"request {r}: expected an object with 'accepted' and 'confidences'")
            accepted, confidences = req["accepted"], req["confidences"]
            if not isinstance(accepted, list) or not isinstance(confidences, list):
                raise TraceFormatError(f"request {r}: 'accepted' and 'confidences' must be lists")
            if len(accepted) != len(confidences):
                raise TraceFormatError(
                    f"request {r}: {len(accepted)} accepted counts but {len(confidences)} confidence rows"
                )
            steps = []
            for i, (a, conf) in enumerate(zip(accepted, confidences, strict=True)):
                if not isinstance(conf, list) or not all(
                    isinstance(c, int | float) and not isinstance(c, bool) for c in conf
                ):
                    raise TraceFormatError(f"request {r} step {i}: confidences must be a list of numbers")
                try:
                    steps.append(TraceStep(a, tuple(conf)))
                except TraceFormatError as exc:
                    raise TraceFormatError(f"request {r} step {i}: {exc}") from None
            requests.append(steps)
        try:
            return cls(
                source=data["source"],
                block_size=data["block_size"],
                temperature=data["temperature"],
                requests=requests,
                meta=data.get("meta", {}),
            )
        except (TypeError, ValueError) as exc:
            raise TraceFormatError(str(exc)) from None

    def save(self, path: str | Path) -> None:
        """Write JSON, gzip-compressed when ``path`` ends in ``.gz`` (parent directories are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), separators=(",", ":")) + "\n"
        if path.suffix == ".gz":
            # no name, mtime=0: the same trace gives the same bytes (shipped files do not churn in git)
            with path.open("wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
                gz.write(text.encode())
        else:
            path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> AcceptanceTrace:
        """Read and validate a trace file; errors name the file and what is wrong in it."""
        path = Path(path)
        raw = path.read_bytes()  # a missing file is the caller's FileNotFoundError, not a format error
        try:
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
            data = json.loads(raw)
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceFormatError(f"{path}: cannot read a JSON trace: {exc}") from exc
        try:
            return cls.from_json(data)
        except TraceFormatError as exc:
            raise TraceFormatError(f"{path}: {exc}") from None
