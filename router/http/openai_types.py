"""The OpenAI request bodies this server accepts, and the sampling settings they map to.

Policy for fields (stricter than vLLM, which logs and ignores unknown fields): a typo must not pass
silently, so

- an unknown field is a 400 naming it (``extra="forbid"``);
- a documented OpenAI field we honour maps onto ``SamplingParams`` (values are the Frontend's to
  judge, so the limits equal the gRPC API's);
- a documented field that changes nothing here (``user``, ``metadata``, ``store``,
  ``service_tier``, ``parallel_tool_calls``) is accepted and ignored;
- a documented field we cannot honour (penalties, ``logit_bias``, ``tools``, ``echo``, ``suffix``,
  ``best_of`` > 1, ``n`` > 1, a non-text ``response_format``) is a 400 naming it, unless it holds its
  neutral value.

Extensions, as in vLLM: ``top_k``, ``ignore_eos``, ``stop_token_ids``, ``cache_salt``, and for chat
``chat_template_kwargs: {"thinking": bool}`` or a top-level ``thinking`` (bool or
``{"type": "enabled"|"disabled"}``, DeepSeek's form) to switch DeepSeek's thinking mode.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.engine.types import RequestError, SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(None, description="send a last chunk with the usage and no choices")
    continuous_usage_stats: bool | None = Field(None, description="vLLM extension: accepted, ignored")


class ThinkingOption(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["enabled", "disabled"]


class _SamplingBody(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model id; absent or empty: the served model")
    temperature: float | None = Field(None, description="0 = greedy (default 1 as OpenAI)")
    top_p: float | None = None
    top_k: int | None = Field(None, ge=0, description="extension: 0 = off")
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, description="extension")
    ignore_eos: bool | None = Field(None, description="extension: generate past the end-of-sentence token")
    n: int | None = Field(None, ge=1, le=1, description="only 1")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, description="only 0")
    frequency_penalty: float | None = Field(None, description="only 0")
    logit_bias: dict[str, float] | None = Field(None, description="only empty")
    user: str | None = Field(None, description="accepted, ignored")
    cache_salt: str | None = Field(None, description="extension: isolates this request's prefix cache")

    def check_unsupported(self) -> None:
        """RequestError naming the first documented field set to a value this server cannot honour."""
        if self.n not in (None, 1):
            raise RequestError("n", f"only n=1 is supported, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise RequestError(name, "penalties are not supported; leave it 0")
        if self.logit_bias:
            raise RequestError("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options", "only allowed with stream: true")

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The sampling settings (OpenAI's defaults where a field is absent: temperature 1)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionBody(_SamplingBody):
    """``POST /v1/completions``: one prompt, as text or token ids (a one-element list of either is
    unwrapped; several prompts are a 400)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1, description=f"default {COMPLETIONS_DEFAULT_MAX_TOKENS}")
    logprobs: int | None = Field(None, ge=0, le=SamplingParams.MAX_LOGPROBS,
                                  description="top-n log-probabilities per token")
    echo: bool | None = Field(None, description="only false")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1")

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise RequestError("echo", "echo is not supported")
        if self.suffix:
            raise RequestError("suffix", "suffix is not supported")
        if self.best_of not in (None, 1):
            raise RequestError("best_of", f"only best_of=1 is supported, got {self.best_of}")

    def prompt_fields(self) -> tuple[str | None, tuple[int, ...] | None]:
        """``(text, None)`` or ``(None, token ids)``."""
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError("prompt", f"one prompt per request is supported, got {len(prompt)}")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt, None
        return None, tuple(prompt)


class ChatCompletionBody(_SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(..., description="the conversation (system, user, assistant, tool)")
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI; max_completion_tokens wins")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: what the context leaves")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=SamplingParams.MAX_LOGPROBS, description="needs logprobs: true")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description='only {"thinking": bool}')
    thinking: bool | ThinkingOption | None = Field(None, description="DeepSeek thinking mode")
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')
    tools: list[dict[str, Any]] | None = Field(None, description="not supported (only empty)")
    tool_choice: str | dict[str, Any] | None = Field(None, description='only "none" or "auto" without tools')
    parallel_tool_calls: bool | None = Field(None, description="accepted, ignored")
    metadata: dict[str, str] | None = Field(None, description="accepted, ignored")
    store: bool | None = Field(None, description="accepted, ignored")
    service_tier: str | None = Field(None, description="accepted, ignored")

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise RequestError("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice", "tool calling is not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestError("response_format", 'only {"type": "text"} is supported')
        extra = sorted(set(self.chat_template_kwargs or ()) - {"thinking"})
        if extra:
            raise RequestError(f"chat_template_kwargs.{extra[0]}", 'only "thinking" is supported')
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs", "needs logprobs: true")

    def thinking_mode(self) -> bool:
        """The thinking switch: ``thinking`` (top level) wins over ``chat_template_kwargs.thinking``."""
        if isinstance(self.thinking, ThinkingOption):
            return self.thinking.type == "enabled"
        if self.thinking is not None:
            return self.thinking
        value = (self.chat_template_kwargs or {}).get("thinking", False)
        if not isinstance(value, bool):
            raise RequestError("chat_template_kwargs.thinking", f"must be a boolean, got {type(value).__name__}")
        return value

    def logprobs_n(self) -> int | None:
        """The engine's ``logprobs`` (top-n alternatives per token), None when off."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
