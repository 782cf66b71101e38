"""Message contracts shared by every InferBus service: structs, subjects, headers, errors."""

from contracts import headers, subjects
from contracts.errors import CATALOGUE, ErrorSpec, InferBusError, invalid
from contracts.llm import (
    TERMINAL,
    Accepted,
    ChatCompletionRequest,
    Chunk,
    CompletionRequest,
    Delta,
    ErrorChunk,
    Final,
    GenerateRequest,
    Heartbeat,
    Message,
    Usage,
)

__all__ = [
    "CATALOGUE",
    "TERMINAL",
    "Accepted",
    "ChatCompletionRequest",
    "Chunk",
    "CompletionRequest",
    "Delta",
    "ErrorChunk",
    "ErrorSpec",
    "Final",
    "GenerateRequest",
    "Heartbeat",
    "InferBusError",
    "Message",
    "Usage",
    "headers",
    "invalid",
    "subjects",
]
