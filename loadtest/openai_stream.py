"""Reading an OpenAI chat stream (SSE) as it arrives: first and last token time, usage, error events.

Pure (no locust import), so it is unit-tested apart from locust.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class StreamTimes:
    """What one streamed response told us, filled chunk by chunk."""

    start: float
    first_token: float | None = None
    last_token: float | None = None
    content_chunks: int = 0
    usage: dict | None = None
    error: str | None = None

    def feed(self, line: str, now: float) -> bool:
        """Take one SSE line; True once `[DONE]` arrived."""
        if not line.startswith("data:"):
            return False
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        event = json.loads(data)
        if "error" in event:
            self.error = str(event["error"].get("message", event["error"]))
            return False
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices", []):
            if choice.get("delta", {}).get("content"):
                self.content_chunks += 1
                self.first_token = self.first_token or now
                self.last_token = now
        return False
