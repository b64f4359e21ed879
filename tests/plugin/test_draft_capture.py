"""``DFLARE_DRAFT_CAPTURE``: block outputs recorded to a file the GPU check reads; nothing when unset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglang_ext.sglang_plugin import draft_capture


def test_records_positions_and_hidden_up_to_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(draft_capture, "_dir", str(tmp_path))
    monkeypatch.setattr(draft_capture, "_records", [])
    monkeypatch.setattr(draft_capture, "LIMIT", 2)
    for start in (10, 20, 30):
        draft_capture.record(
            torch.arange(start, start + 4), torch.full((4, 8), float(start), dtype=torch.bfloat16)
        )
    (saved,) = tmp_path.glob("draft_*.pt")
    records = torch.load(saved)
    assert [int(r["positions"][0]) for r in records] == [10, 20]  # the third is past the limit
    assert records[1]["hidden"].dtype == torch.float32 and float(records[1]["hidden"][0, 0]) == 20.0


def test_off_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(draft_capture, "_dir", None)
    monkeypatch.setattr(draft_capture, "_records", [])
    assert not draft_capture.enabled()
    draft_capture.record(torch.arange(4), torch.zeros(4, 8))
    assert draft_capture._records == []
