"""OpenAI request bodies as pydantic models, shared by the gateway and ``dflare engine-server``.

Only what we serve is modelled; unknown fields are kept (``extra="allow"``) so SGLang-specific
extensions (``chat_template_kwargs``, ``return_meta_info``, ...) pass through the gateway to SGLang.
Constraints follow OpenAI's documented ranges, so a bad value is a 400 at the edge and never reaches
an engine. No torch imports: the gateway image has none.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

# OpenAI allows up to 4 stop sequences; SGLang has no limit. 16 keeps the hold-back window small.
MAX_STOP_SEQUENCES = 16
# Integers are bounded so every valid request stays encodable (JSON int64) on its way upstream.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT_EXACT = 2**53  # every integer up to here is exactly a float
# Choices per request (``n``): each is one engine request, so a cap keeps one call from filling a queue.
MAX_CHOICES = 128


class _Open(BaseModel):
    """Strict: a value of the wrong JSON type (``"stream": 1``, ``"n": "2"``) is refused, as the
    OpenAPI schema says, instead of being converted."""

    model_config = ConfigDict(extra="allow", strict=True)


def _only_false(value: Any) -> Any:
    """``false`` itself, not ``0``: ``Literal[False]`` alone accepts 0, which equals False in Python."""
    if value is not None and not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "Input should be a valid boolean")
    return value


def _stop_limit(value: Any) -> Any:
    """Name the limit when there are too many stop sequences (the union's own error would only say
    that the list is not a string)."""
    if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
        raise PydanticCustomError(
            "too_many_stop_sequences",
            "At most {limit} stop sequences are supported, got {count}",
            {"limit": MAX_STOP_SEQUENCES, "count": len(value)},
        )
    return value


def _prompt_given(value: Any) -> Any:
    """One clear message for an empty prompt in any of its shapes (``""``, ``[]``, ``[""]``, ``[[]]``)."""
    if value in ("", [], [""], [[]]):
        raise PydanticCustomError("empty_prompt", "The prompt is empty")
    return value


def _integral(value: Any) -> Any:
    """A JSON number with no fraction (``5.0``) is an integer, as JSON Schema says; strict mode alone
    would refuse it. Strings and booleans stay refused, and so do floats beyond 2^53, where a float
    no longer holds every integer (orjson also parses integers beyond 64 bits as floats)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= FLOAT_EXACT:
        return int(value)
    return value


def _int(low: int, high: int) -> Any:
    """An integer in ``[low, high]`` (bounds before the validator, so the JSON schema shows them)."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_integral)]


TokenCount = _int(1, INT32_MAX)
# The bound that depends on the model and the prompt, which no static schema can state.
CONTEXT_NOTE = (
    "At most the model's context length minus the prompt's tokens; beyond that the answer is "
    "400 context_length_exceeded."
)
OnlyFalse = Annotated[Literal[False], BeforeValidator(_only_false)]


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


Stop = Annotated[
    str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None, BeforeValidator(_stop_limit)
]


class _SamplingFields(_Open):
    """Fields shared by both endpoints. Ranges are OpenAI's (top_k: SGLang's, -1 or 0 = off)."""

    model: str = Field(min_length=1)
    max_tokens: TokenCount | None = Field(None, description=CONTEXT_NOTE)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: _int(-1, INT32_MAX) | None = None
    seed: _int(INT64_MIN, INT64_MAX) | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: _int(1, MAX_CHOICES) = Field(1, description="choices to generate, each sampled independently")
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = Field(None, description=CONTEXT_NOTE)
    logprobs: OnlyFalse | None = Field(
        None, description="not supported: speculative decoding does not return log-probabilities"
    )


TokenId = _int(0, INT32_MAX)
PromptIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    prompt: Annotated[
        Annotated[str, Field(min_length=1)]
        | PromptIds
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
        | Annotated[list[PromptIds], Field(min_length=1, max_length=1)],
        BeforeValidator(_prompt_given),
    ] = Field(description="one prompt: text or token ids (a batch of one is accepted)")
    max_tokens: TokenCount | None = Field(16, description=CONTEXT_NOTE)
    echo: OnlyFalse = False
    logprobs: None = Field(None, description="not supported with speculative decoding")

    def prompt_value(self) -> str | list[int]:
        """The single prompt, unwrapped from a batch of one."""
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return prompt[0]
        return prompt
