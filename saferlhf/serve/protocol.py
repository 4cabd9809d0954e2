"""The OpenAI request bodies ``task=serve`` accepts, checked strictly (a string is not a
number), and the error shape it answers with."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """A request refused with ``status`` and OpenAI's error body naming ``param``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = None


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``. Fields OpenAI defines that this server cannot honour
    (tools, logprobs, penalties, ...) are refused rather than ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # any name; the answer names the policy served
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None


class ModerationRequest(BaseModel):
    """``POST /v1/moderations``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input: str | list[str]
    model: str | None = None


def field_error(error: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (``messages.0.content``)."""
    first = error.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    value = first.get("input")
    return APIError(
        400, f"{param}: {first['msg']} (got {value!r:.80})", param=param, code="invalid_value"
    )
