"""OpenAI Realtime over WebSocket (`/v1/realtime`): server VAD, ASR -> LLM -> TTS per sentence, barge-in.

`?intent=transcription` (or `session.update` with `type: "transcription"`) makes a dictation session:
partial transcripts while the user speaks (`conversation.item.input_audio_transcription.delta`) and a
final one per turn, no responses. A dictated turn goes to the ASR in phrase windows: cut in a pause once
a window holds MIN_WINDOW_S of audio (at the quietest moment after MAX_WINDOW_S without one), each
transcribed with the text before it as the prompt. A partial follows each window and the final is the
windows' text, so every second of audio is transcribed, and billed, once. With
`audio.input.transcription.partials: false` each turn is transcribed whole (no partials).

Speaks the GA event names the `openai` SDK's realtime client uses (session.update, input_audio_buffer.*,
conversation.item.*, response.create / cancel, response.output_audio.delta, ...); a client that sends
`OpenAI-Beta: realtime=v1` gets the older names (response.audio.delta, ...). Audio in and out is
pcm16, mono, 24 kHz, base64 in the JSON events as the API defines; on the bus it is raw bytes. Client
events are checked against the GA schema (every field read here, with its type); a bad one is answered
with an `error` event that names the field.

Every stream the socket opens is governed like its HTTP twin (scopes, rate limits, concurrency,
budgets): a user turn is one transcription request, a response one chat request and, with audio out,
one speech request. A revoked or expired key's socket gets an error event and is closed.

Turn detection is Silero VAD on 32 ms windows (services/gateway/vad.py; an energy detector where Silero
cannot run): `server_vad` ends a turn after `silence_duration_ms` of silence; `semantic_vad` ends it as
soon as the speculative transcript (below) reads as a finished sentence and the user has been silent for
a moment, later when it does not (`eagerness` sets both waits). While nobody speaks the input buffer
keeps only what a turn starting now would take (the prefix padding and the audio being decided on); a
turn ends after MAX_TURN_S at the latest. When the user speaks during a response, the response is
cancelled: the LLM and TTS streams are closed, which publishes their cancel subjects so the workers free
their slots, and no further audio for it is sent.

Speculation: when the user pauses (vad.PAUSE_MS of silence), the turn's audio so far goes to the ASR at
once and a response is started on that transcript, LLM and TTS, its events held back. If the silence
lasts, the turn ends with that transcript (the silence after it is not transcribed) and the held events
go out at once, first audio included. If the user goes on, the response is cancelled (its workers hear
the cancel subjects) and never heard, while the transcript stays the text of the audio it covered: the
next pause transcribes only what came after it. The first words of an answer go to the TTS as soon as
they end a clause (FIRST_PIECE_WORDS at the latest), the rest sentence by sentence.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web
from msgspec import UNSET, UnsetType

from contracts.errors import InferBusError
from contracts.llm import Delta, Final, GenerateRequest, Message
from contracts.speech import (
    INLINE_MAX,
    AudioChunk,
    Segment,
    SpeechRequest,
    TranscribeRequest,
    Transcript,
    asr_chunk_decoder,
    asr_encoder,
    tts_chunk_decoder,
)
from contracts.speech import SpeechDone as SpeechDoneChunk
from services.gateway import traced
from services.gateway.auth import KeyRecord, bearer
from services.gateway.errors import from_validation
from services.gateway.governance import Grant
from services.gateway.realtime_events import (
    DECODERS,
    AppendEvent,
    AudioUpdate,
    Envelope,
    InputAudioUpdate,
    ItemCreateEvent,
    NoFields,
    OutputAudioUpdate,
    ResponseCancelEvent,
    ResponseCreateEvent,
    ResponseParams,
    SessionAudio,
    SessionConfig,
    SessionUpdateEvent,
    Transcription,
    TurnDetection,
    schema_error,
    unsupported,
)
from services.gateway.realtime_speech import first_piece, reads_finished, split_sentences, whisper_wav
from services.gateway.speech_routes import engine_voice
from services.gateway.state import GATEWAY, Gateway
from services.gateway.vad import Detector, Thresholds
from services.gateway.vad import create as create_vad
from services.runtime import logging as log
from services.runtime import tracing

routes = web.RouteTableDef()

RATE = 24_000
BYTES_PER_S = RATE * 2
FRAME_BYTES = BYTES_PER_S // 50  # 20 ms of pcm16
SUBPROTOCOL_KEY = "openai-insecure-api-key."
BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}
MIN_WINDOW_S = 1.0  # dictation: a window is cut at the first pause after this much audio
MAX_WINDOW_S = 4.0  # ... or, with no pause, at the quietest moment of its last 300 ms
# semantic_vad: (silence after a transcript that reads as finished, silence after one that does not), in ms
EAGERNESS = {"high": (200, 1000), "medium": (300, 2000), "auto": (300, 2000), "low": (600, 4000)}
MIN_SPECULATION_S = 0.3  # a pause after less new speech than this starts nothing
MAX_TURN_S = 15.0  # a turn is committed by then (a 16 kHz wav of it fits one bus message)
MAX_EVENT_BYTES = 4 << 20  # one client event (aiohttp's default; a 15 s append is about 1 MB)
HISTORY = 20  # conversation items the LLM sees


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _set(value: Any, default: Any) -> Any:
    return default if value is UNSET else value


class Close(NamedTuple):
    code: int
    reason: str


# ---- turn detection and one user turn -----------------------------------------------------------


class Turn:
    """One user turn: its audio goes to the ASR in one request, or in windows while it is dictated."""

    def __init__(self, item_id: str, start: int) -> None:
        self.item_id = item_id
        self.start = start  # stream offset (bytes) of its first audio
        self.window_start = start  # ... of the audio not sent to the ASR yet
        self.request_id = new_id("rt-asr")
        self.requests = 0
        self.texts: list[str] = []
        self.sent = 0  # bytes of audio sent to the ASR: what is billed
        self.last: asyncio.Task[None] | None = None  # the latest window's transcription
        self.grant: Grant | None = None
        self.admitted = False
        self.model = ""
        self.error: InferBusError | None = None

    def next_request_id(self) -> str:
        self.requests += 1
        return f"{self.request_id}-{self.requests}"

    @property
    def text(self) -> str:
        return " ".join(t for t in self.texts if t)


class Speculation:
    """A response started at a pause in `turn`, its events held until the turn ends (then sent) or the
    user goes on (then it is cancelled and nothing of it is sent)."""

    def __init__(self, session: Session, turn: Turn) -> None:
        self.session = session
        self.turn = turn
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.held: list[dict[str, Any]] = []
        self.live = False
        self.response_id: str | None = None
        self.item_id: str | None = None
        self.answer: str | None = None  # the answer's text, when it finished before the turn ended
        self.marks = {"pause": self.started}  # time.monotonic() of each stage, logged when it is taken

    def mark(self, stage: str) -> None:
        self.marks.setdefault(stage, time.monotonic())

    def emit(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind.endswith("transcript.delta") or kind == "response.output_text.delta":
            self.mark("first_token")
        elif kind == "response.output_audio.delta":
            self.mark("first_audio")
        if self.live:
            self.session.emit(event)
        else:
            self.held.append(event)

    def cancel(self) -> None:
        if self.task is not None and not self.live:
            self.task.cancel()


def _piece(text: str) -> str:
    """One window's text, ready to join the next: whisper marks a window cut mid-sentence with '...'."""
    text = text.strip()
    return text[:-3].rstrip() if text.endswith("...") else text


# ---- the session ----------------------------------------------------------------------------------


class Session:
    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, key: KeyRecord, model: str, beta: bool) -> None:
        self.gw = gw
        self.ws = ws
        self.key = key
        self.beta = beta
        self.id = new_id("sess")
        self.config = SessionConfig(id=self.id, model=model)
        self.items: deque[tuple[str, str]] = deque(maxlen=HISTORY)  # (role, text) history for the LLM
        self.last_item: str | None = None
        self.transcription_only = False  # a transcription session: partial and final transcripts, no responses
        self.buffer = bytearray()
        self.audio_end = 0  # stream offset (bytes) just after the last audio appended
        self.turn: Turn | None = None  # the turn being spoken (server VAD)
        self.speculation: Speculation | None = None  # a held response on the turn being spoken
        self.turns: set[Turn] = set()  # turns whose transcription holds a grant
        self.vad = self._vad()
        self.outbox: asyncio.Queue[dict[str, Any] | Close | None] = asyncio.Queue()
        self.response: asyncio.Task[None] | None = None
        self.response_id: str | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.transcribing: set[asyncio.Task[None]] = set()  # committed turns not transcribed yet
        self.ending = False  # revoked: the close is on its way, nothing more is read
        self.traceparent: str | None = None  # the upgrade request's: the parent of the session's spans
        self.logger = log.get("realtime")

    # ---- plumbing ----------------------------------------------------------------------------

    @property
    def td(self) -> TurnDetection | None:
        return self.config.audio.input.turn_detection

    @property
    def partials(self) -> bool:
        tr = self.config.audio.input.transcription
        return tr.partials if tr is not None and tr.partials is not None else self.transcription_only

    def _vad(self) -> Detector:
        td = self.td or TurnDetection()
        silence = EAGERNESS[td.eagerness][1] if td.type == "semantic_vad" else td.silence_duration_ms
        return create_vad(Thresholds(td.threshold, silence), self.audio_end)

    def alias(self, model: str) -> str:
        return self.gw.settings.model_aliases.get(model, model)

    def emit(self, event: dict[str, Any]) -> None:
        if self.beta:
            event["type"] = BETA_NAMES.get(event["type"], event["type"])
        event["event_id"] = new_id("event")
        self.outbox.put_nowait(event)

    def error(self, message: str, code: str = "invalid_request_error", event_id: str | None = None,
              param: str | None = None, kind: str = "invalid_request_error") -> None:
        self.emit({"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                              "event_id": event_id}})

    def failed(self, exc: InferBusError, event_id: str | None = None) -> None:
        self.error(exc.message, code=exc.code, event_id=event_id, param=exc.param, kind=exc.spec.type)

    def revoked(self) -> None:
        self.ending = True
        self.failed(InferBusError("invalid_api_key", "This API key has been revoked or has expired"))
        self.outbox.put_nowait(Close(WSCloseCode.POLICY_VIOLATION, "invalid_api_key"))

    async def writer(self) -> None:
        try:
            while (event := await self.outbox.get()) is not None:
                if isinstance(event, Close):
                    await self.ws.close(code=event.code, message=event.reason.encode())
                    return
                if self.ws.closed:
                    return
                await self.ws.send_str(json.dumps(event))
        except ConnectionError:  # the client is gone
            return

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for turn in list(self.turns):
            self.release(turn)
        self.outbox.put_nowait(None)

    # ---- client events -----------------------------------------------------------------------

    async def handle(self, raw: str) -> None:
        if self.ending:
            return
        try:
            envelope = DECODERS[Envelope].decode(raw)
        except msgspec.MsgspecError as exc:
            self.failed(from_validation(exc))
            return
        except RecursionError:
            self.error("events must be JSON objects; this one is nested too deeply")
            return
        kind, event_id = envelope.type, envelope.event_id
        handlers: dict[str, tuple[type, Callable[[Any, str | None], Awaitable[None]]]] = {
            "session.update": (SessionUpdateEvent, self.on_session_update),
            "input_audio_buffer.append": (AppendEvent, self.on_append),
            "input_audio_buffer.commit": (NoFields, self.on_commit),
            "input_audio_buffer.clear": (NoFields, self.on_clear),
            "conversation.item.create": (ItemCreateEvent, self.on_item_create),
            "response.create": (ResponseCreateEvent, self.on_response_create),
            "response.cancel": (ResponseCancelEvent, self.on_response_cancel),
        }
        known = handlers.get(kind)
        if known is None:
            self.error(f"unknown or unsupported event type {kind[:64]!r}", event_id=event_id, param="type")
            return
        schema, handler = known
        try:
            event = DECODERS[schema].decode(raw)
        except msgspec.MsgspecError as exc:
            message, param = schema_error(exc)
            self.error(f"invalid {kind} event: {message}", code="invalid_value", event_id=event_id, param=param)
            return
        except RecursionError:
            self.error(f"invalid {kind} event: nested too deeply", code="invalid_value", event_id=event_id)
            return
        try:
            await handler(event, event_id)
        except InferBusError as exc:
            self.failed(exc, event_id)

    async def on_session_update(self, event: SessionUpdateEvent, event_id: str | None) -> None:
        u = event.session
        c = self.config
        if u.tools:
            raise unsupported("session.tools", "tools")
        if u.prompt is not None:
            raise unsupported("session.prompt", "prompt templates")
        if not isinstance(u.model, UnsetType) and self.alias(u.model) != c.model:
            raise unsupported("session.model", "model changes within a session (open a new one)")
        inp, out = c.audio.input, c.audio.output
        a = u.audio if not isinstance(u.audio, UnsetType) else AudioUpdate()
        ai = a.input if not isinstance(a.input, UnsetType) else InputAudioUpdate()
        ao = a.output if not isinstance(a.output, UnsetType) else OutputAudioUpdate()
        modalities = _set(u.output_modalities, UNSET)
        if modalities is UNSET and not isinstance(u.modalities, UnsetType):  # beta: ["text"] or ["audio", "text"]
            modalities = ["audio"] if "audio" in u.modalities else ["text"]
        inp = msgspec.structs.replace(
            inp,
            format=_set(ai.format, inp.format),
            transcription=_set(ai.transcription, _set(u.input_audio_transcription, inp.transcription)),
            turn_detection=_set(ai.turn_detection, _set(u.turn_detection, inp.turn_detection)),
        )
        out = msgspec.structs.replace(
            out, format=_set(ao.format, out.format), voice=_set(ao.voice, _set(u.voice, out.voice)),
            speed=_set(ao.speed, _set(u.speed, out.speed)), model=_set(ao.model, out.model),
        )
        old_td = self.td
        self.config = msgspec.structs.replace(
            c,
            type="transcription" if u.type == "transcription" or c.type == "transcription" else "realtime",
            instructions=_set(u.instructions, c.instructions),
            output_modalities=_set(modalities, c.output_modalities),
            max_output_tokens=_set(u.max_output_tokens, _set(u.max_response_output_tokens, c.max_output_tokens)),
            temperature=_set(u.temperature, c.temperature),
            audio=SessionAudio(input=inp, output=out),
        )
        if self.config.type == "transcription":
            self.transcription_only = True
        if self.td != old_td:
            if self.turn is not None:  # the detector that found it is gone: the turn ends here
                self.end_turn(self.audio_end)
            self.vad = self._vad()
        self.emit({"type": "session.updated", "session": msgspec.to_builtins(self.config)})

    async def on_append(self, event: AppendEvent, event_id: str | None) -> None:
        try:
            pcm = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            raise InferBusError("invalid_request", "audio must be base64-encoded pcm16", param="audio") from None
        if len(pcm) % 2:
            raise InferBusError("invalid_request", "pcm16 audio must have an even number of bytes", param="audio")
        td = self.td
        if td is None and len(self.buffer) + len(pcm) > MAX_TURN_S * BYTES_PER_S:
            raise InferBusError("invalid_request", f"the input audio buffer holds {MAX_TURN_S:.0f} s at most: "
                                "commit or clear it first", param="audio")
        self.buffer += pcm
        self.audio_end += len(pcm)
        if td is None:
            return
        for detected in self.vad.feed(pcm):
            if detected.kind == "start":
                self.speech_started(detected.at, td)
            elif detected.kind == "pause":
                self.paused(detected.at, td)
            elif detected.kind == "resume":
                self.resumed(detected.at)
            elif self.turn is not None:
                self.stopped(detected.at)
        turn = self.turn
        if turn is None:  # nobody speaks: keep only what a turn starting in the next frames would take
            self.drop(self.audio_end - self.prefix_bytes(td) - self.vad.pending())
        elif td.type == "semantic_vad" and self.semantic_end(turn, td):
            self.vad.end()
            self.stopped(self.audio_end)
        elif self.partials and self.audio_end - turn.window_start >= MAX_WINDOW_S * BYTES_PER_S:
            self.window(turn, self.vad.quietest())
        elif self.audio_end - turn.window_start >= MAX_TURN_S * BYTES_PER_S:
            self.stopped(self.audio_end)
            self.speech_started(self.audio_end, td, prefix=False)

    @staticmethod
    def prefix_bytes(td: TurnDetection) -> int:
        return td.prefix_padding_ms * RATE // 1000 * 2

    @staticmethod
    def ms(offset: int) -> int:
        return offset * 1000 // BYTES_PER_S

    @property
    def buffer_start(self) -> int:
        return self.audio_end - len(self.buffer)

    def drop(self, before: int) -> None:
        """Forget the buffered audio before stream offset `before`."""
        if before > self.buffer_start:
            del self.buffer[: before - self.buffer_start]

    def take(self, upto: int) -> bytes:
        """The buffered audio up to stream offset `upto`, out of the buffer."""
        n = max(min(upto, self.audio_end) - self.buffer_start, 0)
        audio = bytes(self.buffer[:n])
        del self.buffer[:n]
        return audio

    def speech_started(self, at: int, td: TurnDetection, prefix: bool = True) -> None:
        start = max(at - (self.prefix_bytes(td) if prefix else 0), self.buffer_start)
        self.drop(start)
        self.turn = Turn(new_id("item"), start)
        self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": self.ms(at),
                   "item_id": self.turn.item_id})
        if self.response is not None and not self.response.done() and td.interrupt_response:
            self.response.cancel()  # barge-in

    def stopped(self, at: int) -> None:
        assert self.turn is not None
        self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": self.ms(at),
                   "item_id": self.turn.item_id})
        self.end_turn(at)

    def resumed(self, at: int) -> None:
        """Speech again after a pause: a dictation window ends in the pause; a speculative answer is dropped."""
        turn = self.turn
        if self.partials and turn is not None and at - turn.window_start >= MIN_WINDOW_S * BYTES_PER_S:
            self.window(turn, at)
        self.drop_speculation()

    def paused(self, at: int, td: TurnDetection) -> None:
        """The user went quiet: transcribe what they said and start answering it, held back (see Speculation)."""
        turn = self.turn
        if (turn is None or self.partials or self.transcription_only or not td.create_response
                or turn.error is not None or self.speculation is not None
                or (self.response is not None and not self.response.done())
                or any(not t.done() for t in self.transcribing)
                or at - turn.window_start < MIN_SPECULATION_S * BYTES_PER_S):
            return
        self.window(turn, at)
        spec = self.speculation = Speculation(self, turn)
        spec.task = self.spawn(self.respond(ResponseParams(), spec))

    def drop_speculation(self) -> None:
        spec, self.speculation = self.speculation, None
        if spec is not None:
            spec.cancel()
            self.logger.info("speculation_dropped", **{k: round(v, 4) for k, v in spec.marks.items()})

    def semantic_end(self, turn: Turn, td: TurnDetection) -> bool:
        """semantic_vad: the turn is over when the silence so far is enough for what the user said."""
        quiet = self.vad.quiet_ms()
        finished, unfinished = EAGERNESS[td.eagerness]
        if quiet < finished:
            return False
        spec = self.speculation
        if spec is None or spec.turn is not turn or turn.last is None or not turn.last.done():
            return False  # not heard yet: the detector's own (unfinished) silence applies
        return reads_finished(turn.text) or quiet >= unfinished

    def window(self, turn: Turn, upto: int) -> None:
        """Dictation: the turn's audio up to `upto` goes to the ASR now; a partial transcript follows."""
        audio = self.take(upto)
        turn.window_start = max(upto, turn.window_start)
        if audio:
            turn.last = self.spawn(self.transcribe_window(turn, audio, turn.last))

    def end_turn(self, at: int) -> None:
        turn, self.turn = self.turn, None
        spec, self.speculation = self.speculation, None
        if turn is None:
            if spec is not None:
                spec.cancel()
            return
        audio = self.take(at)
        if spec is not None and spec.turn is turn:
            audio = b""  # only silence since the speculation's window: its transcript is the turn's
        elif spec is not None:
            spec.cancel()
            spec = None
        self.commit(turn, audio, spec)

    async def on_commit(self, event: NoFields, event_id: str | None) -> None:
        turn = self.turn
        if turn is None and len(self.buffer) < FRAME_BYTES * 5:
            self.error("buffer too small: at least 100 ms of audio is needed to commit",
                       code="input_audio_buffer_commit_empty", event_id=event_id)
            return
        if turn is None:
            self.commit(Turn(new_id("item"), self.buffer_start), self.take(self.audio_end))
            return
        self.end_turn(self.audio_end)
        td = self.td
        if td is not None and self.vad.speaking:  # the user goes on talking: that is a new turn
            self.speech_started(self.audio_end, td, prefix=False)

    async def on_clear(self, event: NoFields, event_id: str | None) -> None:
        self.buffer.clear()
        if self.turn is not None:
            self.turn.window_start = self.audio_end
        self.emit({"type": "input_audio_buffer.cleared"})

    async def on_item_create(self, event: ItemCreateEvent, event_id: str | None) -> None:
        item = event.item
        text = "".join(part.text or part.transcript or "" for part in item.content)
        item_id = item.id or new_id("item")
        self.items.append((item.role, text))
        view = {"id": item_id, "type": "message", "role": item.role, "status": "completed",
                "content": msgspec.to_builtins(item.content)}
        self.emit({"type": "conversation.item.added", "previous_item_id": self.last_item, "item": view})
        self.emit({"type": "conversation.item.done", "previous_item_id": self.last_item, "item": view})
        self.last_item = item_id

    async def on_response_create(self, event: ResponseCreateEvent, event_id: str | None) -> None:
        if self.transcription_only:
            self.error("a transcription session does not create responses", event_id=event_id)
            return
        if self.response is not None and not self.response.done():
            self.error("Conversation already has an active response", code="conversation_already_has_active_response",
                       event_id=event_id)
            return
        params = event.response or ResponseParams()
        if params.tools:
            raise unsupported("response.tools", "tools")
        if params.prompt is not None:
            raise unsupported("response.prompt", "prompt templates")
        if params.input is not None:
            raise unsupported("response.input", "responses over items of their own")
        self.start_response(params)

    async def on_response_cancel(self, event: ResponseCancelEvent, event_id: str | None) -> None:
        active = self.response is not None and not self.response.done()
        if not active or event.response_id not in (None, self.response_id):
            self.error("no active response to cancel", code="response_cancel_not_active", event_id=event_id)
            return
        assert self.response is not None
        self.response.cancel()

    # ---- a user turn: commit -> transcript -> response ---------------------------------------

    def commit(self, turn: Turn, audio: bytes, spec: Speculation | None = None) -> None:
        item_id = turn.item_id
        self.emit({"type": "input_audio_buffer.committed", "previous_item_id": self.last_item, "item_id": item_id})
        view = {"id": item_id, "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        self.emit({"type": "conversation.item.added", "previous_item_id": self.last_item, "item": view})
        self.last_item = item_id
        self.transcribing.add(self.spawn(self.transcribe_turn(turn, audio, view, spec)))

    async def admit(self, turn: Turn) -> None:
        """The turn's transcription under the key's scopes and limits: one request, however many windows."""
        if turn.admitted:
            return
        tr = self.config.audio.input.transcription or Transcription()
        turn.model = self.alias(tr.model)
        self.turns.add(turn)
        turn.grant = await self.gw.admit_request(self.key, "/v1/realtime", "asr", turn.model, turn.request_id)
        turn.admitted = True

    def release(self, turn: Turn) -> None:
        if turn in self.turns:
            self.turns.discard(turn)
            self.gw.release(self.key, turn.grant, turn.model)

    async def transcribe_window(self, turn: Turn, audio: bytes, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)  # in order: each prompts the next
        if turn.error is not None:
            return  # the turn failed: its final says so, and nothing more is sent (or billed)
        try:
            await self.admit(turn)
            text = _piece(await self.transcribe(audio, turn))
        except InferBusError as exc:
            turn.error = exc
            return
        turn.texts.append(text)
        if text:
            self.emit({"type": "conversation.item.input_audio_transcription.delta", "item_id": turn.item_id,
                       "content_index": 0, "delta": (" " if len(turn.texts) > 1 else "") + text,
                       "transcript": turn.text})

    async def transcribe_turn(self, turn: Turn, audio: bytes, view: dict[str, Any],
                              spec: Speculation | None) -> None:
        task = asyncio.current_task()
        try:
            await self._transcribe_turn(turn, audio, view, spec)
        finally:
            self.release(turn)
            if task is not None:
                self.transcribing.discard(task)
            if spec is not None:
                spec.cancel()  # not taken up: nothing of it is ever sent

    async def _transcribe_turn(self, turn: Turn, audio: bytes, view: dict[str, Any],
                               spec: Speculation | None) -> None:
        if turn.last is not None:
            await asyncio.gather(turn.last, return_exceptions=True)
        try:
            if turn.error is not None:
                raise turn.error
            if audio:
                await self.admit(turn)
                turn.texts.append(_piece(await self.transcribe(audio, turn)))
        except InferBusError as exc:
            self.emit({"type": "conversation.item.input_audio_transcription.failed", "item_id": turn.item_id,
                       "content_index": 0, "error": {"type": "transcription_error", "code": exc.code,
                                                     "message": exc.message}})
            return
        transcript = turn.text
        self.emit({"type": "conversation.item.input_audio_transcription.completed", "item_id": turn.item_id,
                   "content_index": 0, "transcript": transcript,
                   "usage": {"type": "duration", "seconds": round(turn.sent / BYTES_PER_S, 3)}})
        view["content"][0]["transcript"] = transcript
        self.emit({"type": "conversation.item.done", "item": view})
        self.items.append(("user", transcript))
        # With turn detection the server answers by itself; without (push-to-talk) the client sends
        # response.create, which waits for this transcript.
        td = self.td
        idle = self.response is None or self.response.done()
        if td and transcript.strip() and td.create_response and idle and not self.transcription_only:
            started = spec is not None and spec.task is not None and not spec.task.cancelled() and (
                spec.response_id is not None or not spec.task.done())
            if started:
                assert spec is not None
                self.adopt(spec)
            else:
                self.start_response(ResponseParams())

    def adopt(self, spec: Speculation) -> None:
        """The turn ended as speculated: its response goes out, what it already made at once."""
        assert spec.task is not None
        spec.live = True
        for event in spec.held:
            self.emit(event)
        spec.held.clear()
        self.response, self.response_id = spec.task, spec.response_id
        if spec.item_id is not None:
            self.last_item = spec.item_id
        if spec.answer:
            self.items.append(("assistant", spec.answer))
        spec.mark("taken")
        # Stage times (time.monotonic(), the clock bench/bench_voice.py's perf_counter shares on Linux).
        self.logger.info("speculation_taken", **{k: round(v, 4) for k, v in spec.marks.items()})

    async def transcribe(self, pcm: bytes, turn: Turn) -> str:
        tr = self.config.audio.input.transcription or Transcription()
        payload = await asyncio.to_thread(whisper_wav, pcm)
        if len(payload) > INLINE_MAX:
            raise InferBusError("invalid_request", "this turn is too long to transcribe (over ~16 s of speech)")
        prompt = turn.text[-400:] or tr.prompt
        request = TranscribeRequest(request_id=turn.next_request_id(), model=turn.model, audio=payload,
                                    filename="turn.wav", language=tr.language, prompt=prompt,
                                    beam_size=tr.beam_size)
        turn.sent += len(pcm)
        span = traced.socket_span(f"realtime transcription {turn.model}", self.traceparent, {
            tracing.OPERATION: "transcription", traced.TRANSPORT: "realtime", tracing.REQUEST_MODEL: turn.model,
            "inferbus.request.id": request.request_id,
        })
        error: str | None = None
        try:
            route = self.gw.catalogue.route(turn.model, "asr", key_id=self.key.id)
            chunks = self.gw.dispatcher.open(
                "asr", turn.model, route, asr_encoder.encode(request), request.request_id, decoder=asr_chunk_decoder,
                terminal=(Transcript,), progress=(Segment,), retries=0, deadline=time.time() + 120,
                headers=self.gw.bus_headers(None, self.key),
            )
            text = ""
            try:
                async for chunk in chunks:
                    if isinstance(chunk, Transcript):
                        text = chunk.text.strip()
            finally:
                await chunks.aclose()
            return text
        except InferBusError as exc:
            error = exc.code
            raise
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        finally:
            if span is not None:
                span.end(error)

    # ---- a response: LLM tokens -> sentences -> TTS audio ------------------------------------

    def start_response(self, params: ResponseParams) -> None:
        self.response = self.spawn(self.respond(params))

    async def respond(self, params: ResponseParams, spec: Speculation | None = None) -> None:
        prompt: list[tuple[str, str]] = []
        if spec is None:
            waiting = [t for t in self.transcribing if not t.done()]
            if waiting:  # a committed turn is part of this response's prompt
                await asyncio.gather(*waiting, return_exceptions=True)
        else:
            assert spec.turn.last is not None
            # wait(), not gather(): cancelling this answer must not cancel the window's transcription,
            # which stays the text of the audio it covers.
            await asyncio.wait({spec.turn.last})
            spec.mark("transcript")
            if spec.turn.error is not None or not spec.turn.text.strip():
                return  # nothing to answer: the turn's end says what happened
            prompt = [("user", spec.turn.text)]
        emit = self.emit if spec is None else spec.emit
        response_id, item_id = new_id("resp"), new_id("item")
        if spec is None:
            self.response_id = response_id
        else:
            spec.response_id, spec.item_id = response_id, item_id
        modalities = _set(params.output_modalities, UNSET)
        if modalities is UNSET and not isinstance(params.modalities, UnsetType):
            modalities = ["audio"] if "audio" in params.modalities else ["text"]
        modalities = _set(modalities, self.config.output_modalities)
        audio_out = "audio" in modalities
        shell = {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": [],
                 "output_modalities": modalities}
        emit({"type": "response.created", "response": shell})
        item: dict[str, Any] = {
            "id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []
        }
        emit({"type": "response.output_item.added", "response_id": response_id, "output_index": 0, "item": item})
        part_type = "audio" if audio_out else "text"
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        emit({"type": "response.content_part.added", **where, "part": {"type": part_type}})
        text: list[str] = []
        usage = {"input_tokens": 0, "output_tokens": 0}
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker: asyncio.Task[None] | None = None
        tts_model = self.alias(self.config.audio.output.model)
        tts_grant: Grant | None = None
        status, reason = "completed", None
        tokens: AsyncGenerator[Any, None] | None = None
        # The response's span: the LLM request and each sentence's TTS request (the speaker task) are its children.
        span = traced.socket_span(f"realtime response {self.alias(self.config.model)}", self.traceparent, {
            tracing.OPERATION: "chat", traced.TRANSPORT: "realtime", "inferbus.realtime.response_id": response_id,
        })
        try:
            if audio_out:
                tts_grant = await self.gw.admit_request(self.key, "/v1/realtime", "tts", tts_model,
                                                        f"{response_id}-tts")
                voice = self.voice_of(params)
                style = _set(params.instructions, self.config.instructions)
                speaker = self.spawn(self.speak(sentences, where, tts_model, emit, voice, style))
            tokens = self.generate(params, prompt)
            pending, first = "", True
            async for chunk in tokens:
                if speaker is not None and speaker.done():
                    await speaker  # the speech failed: so does the response
                if isinstance(chunk, Delta) and chunk.text:
                    text.append(chunk.text)
                    kind = "response.output_audio_transcript.delta" if audio_out else "response.output_text.delta"
                    emit({"type": kind, **where, "delta": chunk.text})
                    if speaker is not None:
                        pending += chunk.text
                        if first and (piece := first_piece(pending)) is not None:
                            sentences.put_nowait(piece[0])
                            pending, first = piece[1], False
                        if not first:
                            done, pending = split_sentences(pending)
                            for sentence in done:
                                sentences.put_nowait(sentence)
                elif isinstance(chunk, Final):
                    usage = {"input_tokens": chunk.usage.prompt_tokens, "output_tokens": chunk.usage.completion_tokens}
            if speaker is not None:
                if pending.strip():
                    sentences.put_nowait(pending.strip())
                sentences.put_nowait(None)
                await speaker
        except asyncio.CancelledError:
            status, reason = "cancelled", "turn_detected"
        except InferBusError as exc:
            status, reason = "failed", exc.code
            emit({"type": "error", "error": {"type": exc.spec.type, "code": exc.code, "message": exc.message,
                                             "param": exc.param, "event_id": None}})
        except Exception:
            self.logger.exception("response_failed", response_id=response_id)
            status, reason = "failed", "internal_error"
            emit({"type": "error", "error": {"type": "server_error", "code": "server_error", "param": None,
                                             "message": "The server had an error creating this response",
                                             "event_id": None}})
        finally:
            if tokens is not None:
                await tokens.aclose()  # at once: the LLM worker hears the cancel
            if speaker is not None and not speaker.done():
                speaker.cancel()  # closes its TTS stream: the worker hears the cancel
                await asyncio.gather(speaker, return_exceptions=True)
            self.gw.release(self.key, tts_grant, tts_model)
            if span is not None:
                span.end(reason if status == "failed" else None, {  # a barge-in's cancel is no failure
                    "inferbus.realtime.status": status, tracing.INPUT_TOKENS: usage["input_tokens"],
                    tracing.OUTPUT_TOKENS: usage["output_tokens"]})
        transcript = "".join(text)
        live = spec is None or spec.live
        if transcript and live:
            self.items.append(("assistant", transcript))
        elif spec is not None:
            spec.answer = transcript
        if audio_out:
            emit({"type": "response.output_audio_transcript.done", **where, "transcript": transcript})
            emit({"type": "response.output_audio.done", **where})
        else:
            emit({"type": "response.output_text.done", **where, "text": transcript})
        part: dict[str, Any] = {"type": part_type, ("transcript" if audio_out else "text"): transcript}
        emit({"type": "response.content_part.done", **where, "part": part})
        item = {**item, "status": "completed" if status == "completed" else "incomplete", "content": [part]}
        emit({"type": "response.output_item.done", "response_id": response_id, "output_index": 0, "item": item})
        if live:
            self.last_item = item_id
        total = usage["input_tokens"] + usage["output_tokens"]
        emit({"type": "response.done", "response": {
            **shell, "status": status, "output": [item],
            "status_details": {"type": status, "reason": reason} if reason else None,
            "usage": {"total_tokens": total, "input_tokens": usage["input_tokens"],
                      "output_tokens": usage["output_tokens"],
                      "input_token_details": {"text_tokens": usage["input_tokens"], "audio_tokens": 0},
                      "output_token_details": {"text_tokens": usage["output_tokens"], "audio_tokens": 0}},
        }})

    def max_tokens(self, params: ResponseParams) -> int:
        limit = _set(params.max_output_tokens, _set(params.max_response_output_tokens, self.config.max_output_tokens))
        # "inf": as long as the model goes, up to what a chat request without max_tokens gets
        return self.gw.settings.default_max_tokens if limit == "inf" else int(limit)

    async def generate(self, params: ResponseParams, prompt: list[tuple[str, str]]) -> AsyncGenerator[Any, None]:
        cfg = self.config
        messages = [Message("system", _set(params.instructions, cfg.instructions))]
        messages += [Message(role, content) for role, content in [*self.items, *prompt]]
        model = self.alias(cfg.model)
        request = GenerateRequest(request_id=new_id("rt-llm"), model=model, messages=messages,
                                  max_tokens=self.max_tokens(params),
                                  temperature=_set(params.temperature, cfg.temperature))
        grant = await self.gw.admit(self.key, "/v1/realtime", request)
        chunks = self.gw.dispatcher.generate(
            request, kind="llm", timeout_s=120, headers=self.gw.bus_headers(None, self.key), key_id=self.key.id
        )
        if grant is not None:
            assert self.gw.governor is not None
            chunks = self.gw.governor.governed(self.key.id, grant, chunks, model)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # on cancel too: publishes the LLM's cancel subject

    def voice_of(self, params: ResponseParams) -> str:
        """The response's voice (GA `audio.output.voice`, or the beta `voice`), else the session's."""
        output = (params.audio or {}).get("output")
        voice = output.get("voice") if isinstance(output, dict) else None
        chosen = voice if isinstance(voice, str) and voice else params.voice
        return chosen or self.config.audio.output.voice

    async def speak(self, sentences: asyncio.Queue[str | None], where: dict[str, Any], model: str,
                    emit: Callable[[dict[str, Any]], None], voice: str, style: str) -> None:
        """The answer's pieces through the TTS in order; `style` (the instructions) sets how they sound."""
        index = 0
        while (sentence := await sentences.get()) is not None:
            request = SpeechRequest(request_id=f"{where['response_id']}-tts{index}", model=model, input=sentence,
                                    speed=self.config.audio.output.speed, voice=engine_voice(voice),
                                    instructions=style or None)
            index += 1
            route = self.gw.catalogue.route(model, "tts", key_id=self.key.id)
            chunks = self.gw.dispatcher.open(
                "tts", model, route, asr_encoder.encode(request), request.request_id, decoder=tts_chunk_decoder,
                terminal=(SpeechDoneChunk,), progress=(AudioChunk,), retries=0, deadline=time.time() + 120,
                headers=self.gw.bus_headers(None, self.key),
            )
            try:
                async for chunk in chunks:
                    if isinstance(chunk, AudioChunk):
                        emit({"type": "response.output_audio.delta", **where,
                                   "delta": base64.b64encode(chunk.pcm).decode()})
            finally:
                await chunks.aclose()


def _key_from(request: web.Request) -> str:
    if "Authorization" in request.headers:
        return bearer(request.headers["Authorization"])
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        if proto.strip().startswith(SUBPROTOCOL_KEY):
            return proto.strip()[len(SUBPROTOCOL_KEY) :]
    raise InferBusError("invalid_api_key", "Missing API key: send 'Authorization: Bearer <key>'")


@routes.get("/v1/realtime")
async def realtime(request: web.Request) -> web.WebSocketResponse:
    gw = request.app[GATEWAY]
    assert gw.keys is not None
    key = await gw.keys.authenticate(_key_from(request))
    dictation = request.query.get("intent") == "transcription"  # OpenAI's transcription sessions
    model = request.query.get("model") or "smollm2-135m-instruct"
    model = gw.settings.model_aliases.get(model, model)
    if dictation:
        key.authorize("asr", gw.settings.model_aliases.get(Transcription().model, Transcription().model))
    else:
        key.authorize("llm", model)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    ws = web.WebSocketResponse(protocols=("realtime",) if "realtime" in protocols else (), heartbeat=20,
                               max_msg_size=MAX_EVENT_BYTES)
    await ws.prepare(request)
    session = Session(gw, ws, key, model, beta="realtime=v1" in request.headers.get("OpenAI-Beta", ""))
    session.traceparent = request.headers.get("traceparent")
    if dictation:
        session.transcription_only = True
        session.config = msgspec.structs.replace(session.config, type="transcription")
    gw.sockets.add(key, session)
    writer = asyncio.create_task(session.writer())
    session.emit({"type": "session.created", "session": msgspec.to_builtins(session.config)})
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await session.handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                session.error("send JSON text events; audio goes base64 in input_audio_buffer.append")
    finally:
        gw.sockets.discard(key, session)
        await session.close()
        try:
            await asyncio.wait_for(writer, timeout=2)
        except TimeoutError:
            writer.cancel()
    return ws
