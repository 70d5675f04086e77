"""Request bodies of /v1/completions and /v1/chat/completions (OpenAI's fields).

Fields OpenAI defines but this server does not implement are accepted only at their
neutral value (penalties 0, `best_of` 1, no `logit_bias`, no tools), so a client that
sends its defaults works and one that asks for more gets an error naming the field.
Unknown fields are refused (422, naming them)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16                   # choices per prompt
MAX_PROMPTS = 64             # prompts in one completions request
MAX_STOP = 16                # stop strings (OpenAI allows 4; evaluation harnesses send more)
MAX_TOP_LOGPROBS = 20
MAX_TOKENS = 4096            # new tokens per choice (the model's context also bounds it)
MAX_PROMPT_CHARS = 200_000


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=300, description="a base model name, run-<id>, or a run name")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not implemented: only 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not implemented: only 0")
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0, description="not implemented: empty")
    user: Optional[str] = Field(None, max_length=300)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s or len(s) > 200 for s in stops):
            raise ValueError("each stop string must be 1 to 200 characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None and set(v) - {"include_usage"}:
            raise ValueError(f"unknown keys {sorted(set(v) - {'include_usage'})}; only include_usage")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="text, texts, token ids, or lists of token ids")
    max_tokens: Optional[int] = Field(16, ge=0, le=MAX_TOKENS, description="0 with echo: score the prompt only")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                    description="log-probabilities of each token and this many alternatives")
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1, le=1, description="not implemented: only 1")
    suffix: Optional[str] = Field(None, max_length=0, description="not implemented")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str):
            v = [v]
        elif v and all(isinstance(x, int) for x in v):
            v = [v]
        if not v:
            raise ValueError("give at least one prompt")
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        for p in v:
            if isinstance(p, str) and len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"a prompt has {len(p)} characters; at most {MAX_PROMPT_CHARS}")
            if isinstance(p, list) and not p:
                raise ValueError("a prompt of token ids must not be empty")
        return v

    @model_validator(mode="after")
    def _together(self):
        if self.max_tokens is None:
            self.max_tokens = 16
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 only with echo (scoring the prompt)")
        if self.stream and self.logprobs is not None:
            raise ValueError("logprobs: not available with stream; ask without stream")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")   # e.g. `name`, `refusal`: carried by clients, not used here
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1, max_length=500)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = Field(None, max_length=0, description="not implemented: this server calls no tools")
    tool_choice: Optional[Literal["none"]] = None
    parallel_tool_calls: Optional[bool] = None

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError("only {'type': 'text'}: structured output is not implemented")
        return v

    @model_validator(mode="after")
    def _together(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.stream and self.logprobs:
            raise ValueError("logprobs: not available with stream; ask without stream")
        if sum(len(m.text()) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages: more than {MAX_PROMPT_CHARS} characters in all")
        return self

    @property
    def new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens
