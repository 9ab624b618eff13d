"""The OpenAI-shaped API: every request and response body as a pydantic model, and the error
body OpenAI's clients read (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error a client gets as OpenAI's error body with this status code."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param,
        )  # fmt: skip
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


class Request(BaseModel):
    # OpenAI's clients send fields we do not use (user, n=1, ...): ignore what is unknown
    # rather than refuse it, as OpenAI's own server does
    model_config = ConfigDict(extra="ignore")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationFields(Request):
    """What chat and text completions share: the model and the sampling settings."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class ChatCompletionRequest(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


class CompletionRequest(GenerationFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class LoadAdapterRequest(Request):
    lora_name: str
    lora_path: str | None = None
    """Ignored beyond a check: adapters come from the spec's registries, by name."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def stops(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# ---- the comparison page's API (ours: unknown fields are errors) ------------------------------


class ArenaRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignInRequest(ArenaRequest):
    token: str = Field(min_length=1, max_length=200)


class NextRequest(ArenaRequest):
    prompt: str | None = Field(None, description="A prompt of the annotator's own.")


class VoteRequest(ArenaRequest):
    vote_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9-]+$")
    comparison_id: str = Field(min_length=1, max_length=32)
    verdict: Literal["a", "b", "tie", "both_bad"]
    comment: str | None = None
    better_answer: str | None = None
    replaces: str | None = Field(None, max_length=64)
