"""OpenAI request bodies as pydantic models, shared by the gateway and ``dflare engine-server``.

Only what we serve is modelled; unknown fields are kept (``extra="allow"``) so SGLang-specific
extensions (``chat_template_kwargs``, ``return_meta_info``, ...) pass through the gateway to SGLang.
Constraints follow OpenAI's documented ranges, so a bad value is a 400 at the edge and never reaches
an engine. No torch imports: the gateway image has none.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI allows up to 4 stop sequences; SGLang has no limit. 16 keeps the hold-back window small.
MAX_STOP_SEQUENCES = 16
# Integers are bounded so every valid request stays encodable (JSON int64) on its way upstream.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Choices per request (``n``): each is one engine request, so a cap keeps one call from filling a queue.
MAX_CHOICES = 128


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts concatenated)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None


class _SamplingFields(_Open):
    """Fields shared by both endpoints. Ranges are OpenAI's (top_k: SGLang's, -1 or 0 = off)."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices to generate, each sampled independently")
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: Literal[False] | None = Field(
        None, description="not supported: speculative decoding does not return log-probabilities"
    )


TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
PromptIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    prompt: (
        str
        | PromptIds
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[PromptIds], Field(min_length=1, max_length=1)]
    ) = Field(description="one prompt: text or token ids (a batch of one is accepted)")
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    echo: Literal[False] = False
    logprobs: None = Field(None, description="not supported with speculative decoding")

    def prompt_value(self) -> str | list[int]:
        """The single prompt, unwrapped from a batch of one."""
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return prompt[0]
        return prompt
