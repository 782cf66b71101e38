"""The OpenAI Realtime (GA) client events /v1/realtime accepts: typed, bounded, unknown fields refused."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from contracts.errors import InferBusError
from services.gateway.errors import from_validation

MaxTokens = Annotated[int, Meta(ge=1, le=4096)] | Literal["inf"]
Modalities = Annotated[list[Literal["text", "audio"]], Meta(min_length=1, max_length=2)]
Name = Annotated[str, Meta(max_length=128)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
Speed = Annotated[float, Meta(ge=0.25, le=1.5)]
Ignored = dict[str, Any] | str | None  # GA fields with nothing to do here (tracing, truncation, ...)


class Schema(Struct, kw_only=True, forbid_unknown_fields=True):
    """Client event parts: a field the GA schema does not have is an error, as with OpenAI."""


class AudioFormat(Schema, kw_only=True):
    type: Literal["audio/pcm"] = "audio/pcm"  # pcm16 only: g711 is refused, never garbled
    rate: Literal[24000] = 24000


class TurnDetection(Schema, kw_only=True):
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.5
    prefix_padding_ms: Annotated[int, Meta(ge=0, le=5000)] = 300
    silence_duration_ms: Annotated[int, Meta(ge=20, le=10_000)] = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: Annotated[int, Meta(ge=0)] | None = None
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"


class Transcription(Schema, kw_only=True):
    model: Name = "whisper-tiny-en"
    language: Annotated[str, Meta(max_length=16)] | None = None
    prompt: Annotated[str, Meta(max_length=2000)] | None = None
    partials: bool | None = None  # InferBus: partial transcripts (default: in transcription sessions)
    beam_size: Annotated[int, Meta(ge=1, le=10)] | None = None  # InferBus: the ASR's beam (None: its default)


class InputAudio(Struct, kw_only=True):
    format: AudioFormat = msgspec.field(default_factory=AudioFormat)
    transcription: Transcription | None = msgspec.field(default_factory=Transcription)
    turn_detection: TurnDetection | None = msgspec.field(default_factory=TurnDetection)


class OutputAudio(Struct, kw_only=True):
    format: AudioFormat = msgspec.field(default_factory=AudioFormat)
    voice: Name = "alloy"
    speed: Speed = 1.0
    model: Name = "hibari"  # InferBus: the TTS model


class SessionAudio(Struct, kw_only=True):
    input: InputAudio = msgspec.field(default_factory=InputAudio)
    output: OutputAudio = msgspec.field(default_factory=OutputAudio)


class SessionConfig(Struct, kw_only=True):
    """The session as `session.created` / `session.updated` show it."""

    type: Literal["realtime", "transcription"] = "realtime"
    object: str = "realtime.session"
    id: str
    model: str
    output_modalities: Modalities = msgspec.field(default_factory=lambda: ["audio"])
    # The default deployment's system prompt (see services/llm/main.py): SmolLM2 stays on task with it.
    instructions: str = "You are a helpful AI assistant."
    max_output_tokens: MaxTokens = 256
    temperature: Temperature = 0.8
    audio: SessionAudio = msgspec.field(default_factory=SessionAudio)


class InputAudioUpdate(Schema, kw_only=True):
    format: AudioFormat | UnsetType = UNSET
    transcription: Transcription | UnsetType | None = UNSET
    turn_detection: TurnDetection | UnsetType | None = UNSET
    noise_reduction: dict[str, Any] | None = None


class OutputAudioUpdate(Schema, kw_only=True):
    format: AudioFormat | UnsetType = UNSET
    voice: Name | UnsetType = UNSET
    speed: Speed | UnsetType = UNSET
    model: Name | UnsetType = UNSET


class AudioUpdate(Schema, kw_only=True):
    input: InputAudioUpdate | UnsetType = UNSET
    output: OutputAudioUpdate | UnsetType = UNSET


class SessionUpdate(Schema, kw_only=True):
    type: Literal["realtime", "transcription"] | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    output_modalities: Modalities | UnsetType = UNSET
    max_output_tokens: MaxTokens | UnsetType = UNSET
    audio: AudioUpdate | UnsetType = UNSET
    model: Name | UnsetType = UNSET
    tools: list[dict[str, Any]] | None = None
    prompt: dict[str, Any] | None = None
    tool_choice: Ignored = None
    tracing: Ignored = None
    truncation: Ignored = None
    include: list[str] | None = None
    object: str | None = None  # a client may send back the session it was shown
    id: str | None = None
    # the beta names
    modalities: Modalities | UnsetType = UNSET
    max_response_output_tokens: MaxTokens | UnsetType = UNSET
    temperature: Temperature | UnsetType = UNSET
    voice: Name | UnsetType = UNSET
    speed: Speed | UnsetType = UNSET
    turn_detection: TurnDetection | UnsetType | None = UNSET
    input_audio_transcription: Transcription | UnsetType | None = UNSET
    input_audio_format: Literal["pcm16"] | None = None
    output_audio_format: Literal["pcm16"] | None = None
    input_audio_noise_reduction: dict[str, Any] | None = None


class ContentPart(Schema, kw_only=True):
    type: Literal["input_text", "input_audio", "text", "output_text", "audio", "output_audio"]
    text: str | None = None
    transcript: str | None = None
    audio: str | None = None  # the audio itself is not heard again: its transcript is what counts


class Item(Schema, kw_only=True):
    id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    type: Literal["message"] = "message"
    object: Literal["realtime.item"] | None = None
    status: Literal["completed", "incomplete", "in_progress"] | None = None
    role: Literal["user", "system", "assistant"]
    content: list[ContentPart] = []


class ResponseParams(Schema, kw_only=True):
    output_modalities: Modalities | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    max_output_tokens: MaxTokens | UnsetType = UNSET
    conversation: Annotated[str, Meta(max_length=64)] | None = None
    metadata: dict[str, str] | None = None
    input: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    prompt: dict[str, Any] | None = None
    tool_choice: Ignored = None
    audio: dict[str, Any] | None = None
    # the beta names
    modalities: Modalities | UnsetType = UNSET
    max_response_output_tokens: MaxTokens | UnsetType = UNSET
    temperature: Temperature | UnsetType = UNSET
    voice: Name | None = None
    output_audio_format: Literal["pcm16"] | None = None


class Envelope(Struct):
    type: str
    event_id: Annotated[str, Meta(max_length=128)] | None = None


class Event(Schema, kw_only=True):
    type: str
    event_id: str | None = None


class SessionUpdateEvent(Event, kw_only=True):
    session: SessionUpdate


class AppendEvent(Event, kw_only=True):
    audio: str


class ItemCreateEvent(Event, kw_only=True):
    item: Item
    previous_item_id: Annotated[str, Meta(max_length=64)] | None = None


class ResponseCreateEvent(Event, kw_only=True):
    response: ResponseParams | None = None


class ResponseCancelEvent(Event, kw_only=True):
    response_id: Annotated[str, Meta(max_length=64)] | None = None


class NoFields(Event, kw_only=True):
    pass


_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`(?: - at `\$\.?([^`]*)`)?$")


def schema_error(exc: msgspec.MsgspecError) -> tuple[str, str | None]:
    """What is wrong with an event, and the dotted path of the field (`session.audio.input.format.type`)."""
    unknown = _UNKNOWN.match(str(exc))
    if unknown:
        field, at = unknown.groups()
        param = f"{at}.{field}" if at else field
        return f"unknown parameter '{param}'", param
    bad = from_validation(exc)
    return bad.message, bad.param


def unsupported(param: str, what: str) -> InferBusError:
    return InferBusError("unsupported_parameter", f"{what} are not supported by this server", param=param)


DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t)
    for t in (Envelope, SessionUpdateEvent, AppendEvent, ItemCreateEvent, ResponseCreateEvent,
              ResponseCancelEvent, NoFields)
}
