"""OpenAI Realtime over WebSocket (`/v1/realtime`): server VAD, ASR -> LLM -> TTS per sentence, barge-in.

`?intent=transcription` (or `session.update` with `type: "transcription"`) makes a dictation session:
partial transcripts while the user speaks (`conversation.item.input_audio_transcription.delta`, about
one a second) and a final one per turn, no responses.

Speaks the GA event names the `openai` SDK's realtime client uses (session.update, input_audio_buffer.*,
conversation.item.*, response.create / cancel, response.output_audio.delta, ...); a client that sends
`OpenAI-Beta: realtime=v1` gets the older names (response.audio.delta, ...). Audio in and out is
pcm16, mono, 24 kHz, base64 in the JSON events as the API defines; on the bus it is raw bytes.

Turn detection is an energy VAD over 20 ms frames (speech after `prefix` voiced frames, end of turn
after `silence_duration_ms` of silence). When the user speaks during a response, the response is
cancelled: the LLM and TTS streams are closed, which publishes their cancel subjects so the workers
free their slots, and no further audio for it is sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import secrets
import time
import wave
from array import array
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import WSMsgType, web

from contracts.errors import InferBusError
from contracts.llm import Delta, Final, GenerateRequest, Message
from contracts.speech import (
    INLINE_MAX,
    AudioChunk,
    SpeechRequest,
    TranscribeRequest,
    Transcript,
    asr_chunk_decoder,
    asr_encoder,
    tts_chunk_decoder,
)
from contracts.speech import SpeechDone as SpeechDoneChunk
from services.gateway.auth import KeyRecord, bearer
from services.gateway.state import GATEWAY, Gateway
from services.runtime import logging as log

routes = web.RouteTableDef()

RATE = 24_000
FRAME_BYTES = RATE * 2 // 50  # 20 ms of pcm16
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
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
MAX_SENTENCE_CHARS = 160  # no punctuation for this long: speak what there is, cut at a space
PARTIAL_EVERY = RATE * 2  # dictation: a partial transcript per second of new speech


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def wav_bytes(pcm: bytes, rate: int = RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def downsample_16k(pcm: bytes) -> bytes:
    """24 kHz -> 16 kHz pcm16 (2 of every 3 samples, averaged): what whisper wants, a third smaller."""
    samples = array("h", pcm[: len(pcm) - len(pcm) % 6])
    out = array("h", bytes(len(samples) // 3 * 4))
    for i in range(len(samples) // 3):
        a, b, c = samples[3 * i], samples[3 * i + 1], samples[3 * i + 2]
        out[2 * i] = a
        out[2 * i + 1] = (b + c) // 2
    return out.tobytes()


class Vad:
    """Energy voice activity over 20 ms frames, with a start run and a silence hangover."""

    def __init__(self, threshold: float = 0.5, silence_ms: int = 500, prefix_ms: int = 300) -> None:
        # threshold 0..1 -> -60..-10 dBFS
        self.level = 32768 * 10 ** ((-60 + 50 * min(max(threshold, 0.0), 1.0)) / 20)
        self.silence_frames = max(silence_ms // 20, 1)
        self.start_frames = 3
        self.prefix_ms = prefix_ms
        self.speaking = False
        self.voiced = 0
        self.quiet = 0
        self.frames = 0
        self._rest = b""

    def feed(self, pcm: bytes) -> list[tuple[str, int]]:
        """Events ('start' | 'stop', at ms since the first audio) for the frames `pcm` completes."""
        data = self._rest + pcm
        events = []
        whole = len(data) - len(data) % FRAME_BYTES
        for offset in range(0, whole, FRAME_BYTES):
            frame = array("h", data[offset : offset + FRAME_BYTES])
            rms = math.sqrt(sum(s * s for s in frame) / len(frame))
            self.frames += 1
            if rms >= self.level:
                self.voiced += 1
                self.quiet = 0
                if not self.speaking and self.voiced >= self.start_frames:
                    self.speaking = True
                    events.append(("start", max((self.frames - self.start_frames) * 20, 0)))
            else:
                self.voiced = 0
                if self.speaking:
                    self.quiet += 1
                    if self.quiet >= self.silence_frames:
                        self.speaking = False
                        self.quiet = 0
                        events.append(("stop", self.frames * 20))
        self._rest = data[whole:]
        return events


def split_sentences(text: str) -> tuple[list[str], str]:
    """Complete sentences in `text`, and the rest (a long run without punctuation is cut at a space)."""
    parts = _SENTENCE_END.split(text)
    done = [p.strip() for p in parts[:-1] if p.strip()]
    rest = parts[-1]
    while len(rest) > MAX_SENTENCE_CHARS:
        cut = rest.rfind(" ", 0, MAX_SENTENCE_CHARS)
        cut = cut if cut > 0 else MAX_SENTENCE_CHARS
        done.append(rest[:cut].strip())
        rest = rest[cut:]
    return done, rest


class Session:
    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, key: KeyRecord, model: str, beta: bool) -> None:
        self.gw = gw
        self.ws = ws
        self.key = key
        self.beta = beta
        self.id = new_id("sess")
        self.config: dict[str, Any] = {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": model,
            "output_modalities": ["audio"],
            # The default deployment's system prompt (see services/llm/main.py): SmolLM2 stays on task with it.
            "instructions": "You are a helpful AI assistant.",
            "max_output_tokens": 256,
            "temperature": 0.8,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": RATE},
                    "transcription": {"model": "whisper-tiny-en"},
                    "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                       "silence_duration_ms": 500, "create_response": True,
                                       "interrupt_response": True},
                },
                "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "alloy", "model": "hibari"},
            },
        }
        self.items: list[tuple[str, str]] = []  # (role, text) history for the LLM
        self.last_item: str | None = None
        self.pending_item: str | None = None  # the item a detected speech turn will become
        self.transcription_only = False  # a transcription session: partial and final transcripts, no responses
        self.partials = False  # partial transcripts while the user speaks (dictation)
        self.partial: asyncio.Task[None] | None = None
        self.partial_at = 0  # buffer length the last partial transcribed
        self.partial_text = ""
        self.finalized: set[str] = set()  # items whose final transcript was sent
        self.buffer = bytearray()
        self.buffer_start_ms = 0
        self.vad = self._vad()
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.response: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.transcribing: set[asyncio.Task[None]] = set()  # committed turns not transcribed yet
        self.logger = log.get("realtime")

    # ---- plumbing ----------------------------------------------------------------------------

    def _vad(self) -> Vad:
        td = self.config["audio"]["input"]["turn_detection"] or {}
        return Vad(td.get("threshold", 0.5), td.get("silence_duration_ms", 500), td.get("prefix_padding_ms", 300))

    def emit(self, event: dict[str, Any]) -> None:
        if self.beta:
            event["type"] = BETA_NAMES.get(event["type"], event["type"])
        event["event_id"] = new_id("event")
        self.outbox.put_nowait(event)

    def error(self, message: str, code: str = "invalid_request_error", event_id: str | None = None,
              param: str | None = None) -> None:
        self.emit({"type": "error", "error": {"type": "invalid_request_error" if code != "server_error" else code,
                                              "code": code, "message": message, "param": param,
                                              "event_id": event_id}})

    async def writer(self) -> None:
        while (event := await self.outbox.get()) is not None:
            if self.ws.closed:
                return
            await self.ws.send_str(json.dumps(event))

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.outbox.put_nowait(None)

    # ---- client events -----------------------------------------------------------------------

    async def handle(self, raw: str) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            self.error("events must be JSON objects")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.error("events must be JSON objects with a 'type'")
            return
        kind, event_id = event["type"], event.get("event_id")
        handler = {
            "session.update": self.on_session_update,
            "input_audio_buffer.append": self.on_append,
            "input_audio_buffer.commit": self.on_commit,
            "input_audio_buffer.clear": self.on_clear,
            "conversation.item.create": self.on_item_create,
            "response.create": self.on_response_create,
            "response.cancel": self.on_response_cancel,
        }.get(kind)
        if handler is None:
            self.error(f"unknown or unsupported event type {kind!r}", event_id=event_id, param="type")
            return
        try:
            await handler(event)
        except (KeyError, TypeError, ValueError) as exc:
            self.error(f"invalid {kind} event: {exc!r}", event_id=event_id)

    async def on_session_update(self, event: dict[str, Any]) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            raise ValueError("'session' must be an object")
        for field in ("instructions", "output_modalities", "max_output_tokens", "temperature"):
            if field in update:
                self.config[field] = update[field]
        if update.get("modalities"):  # beta name
            self.config["output_modalities"] = ["text"] if "audio" not in update["modalities"] else ["audio"]
        audio = update.get("audio") or {}
        for side in ("input", "output"):
            for field, value in (audio.get(side) or {}).items():
                self.config["audio"][side][field] = value
        if "turn_detection" in update:  # beta name
            self.config["audio"]["input"]["turn_detection"] = update["turn_detection"]
        if "voice" in update:
            self.config["audio"]["output"]["voice"] = update["voice"]
        if update.get("type") == "transcription":
            self.transcription_only = self.partials = True
            self.config["type"] = "transcription"
        partials = (self.config["audio"]["input"].get("transcription") or {}).get("partials")
        if partials is not None:
            self.partials = bool(partials)
        self.vad = self._vad()
        self.emit({"type": "session.updated", "session": self.config})

    async def on_append(self, event: dict[str, Any]) -> None:
        pcm = base64.b64decode(event["audio"], validate=True)
        if len(pcm) % 2:
            raise ValueError("pcm16 audio must have an even number of bytes")
        if not self.buffer:
            self.buffer_start_ms = self.vad.frames * 20
        self.buffer += pcm
        if not self.config["audio"]["input"]["turn_detection"]:
            return
        for what, at_ms in self.vad.feed(pcm):
            if what == "start":
                item_id = new_id("item")
                self.pending_item = item_id
                self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": at_ms, "item_id": item_id})
                td = self.config["audio"]["input"]["turn_detection"]
                if self.response is not None and not self.response.done() and td.get("interrupt_response", True):
                    self.response.cancel()  # barge-in
                keep = int(td.get("prefix_padding_ms", 300) * RATE * 2 / 1000)
                self.buffer = self.buffer[-(len(pcm) + keep) :] if len(self.buffer) > len(pcm) + keep else self.buffer
                self.partial_at, self.partial_text = 0, ""
            else:
                item_id = self.pending_item or new_id("item")
                self.pending_item = None
                self.partial_text = ""
                self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": at_ms, "item_id": item_id})
                self.commit(item_id)
        self.maybe_partial()

    def maybe_partial(self) -> None:
        """Dictation: while the user speaks, transcribe what there is every PARTIAL_EVERY of new audio."""
        if not (self.partials and self.vad.speaking and self.pending_item):
            return
        if self.partial is not None and not self.partial.done():
            return  # one at a time; the next starts with the audio that came meanwhile
        if len(self.buffer) - self.partial_at < PARTIAL_EVERY:
            return
        self.partial_at = len(self.buffer)
        self.partial = self.spawn(self.transcribe_partial(self.pending_item, bytes(self.buffer)))

    async def transcribe_partial(self, item_id: str, audio: bytes) -> None:
        try:
            text = await self.transcribe(audio)
        except InferBusError:
            return  # a partial is a hint; the final transcript reports failures
        if item_id in self.finalized or not text:
            return  # the final transcript is out: it supersedes this
        new = text[len(self.partial_text) :] if text.startswith(self.partial_text) else text
        self.partial_text = text
        # `delta` extends what was sent before when the hypothesis grew; `transcript` is always the whole
        # current hypothesis (earlier words may be revised), for apps that redraw the line.
        self.emit({"type": "conversation.item.input_audio_transcription.delta", "item_id": item_id,
                   "content_index": 0, "delta": new, "transcript": text})

    async def on_commit(self, event: dict[str, Any]) -> None:
        if len(self.buffer) < FRAME_BYTES * 5:
            self.error("buffer too small: at least 100 ms of audio is needed to commit",
                       code="input_audio_buffer_commit_empty", event_id=event.get("event_id"))
            return
        self.commit(new_id("item"))

    async def on_clear(self, event: dict[str, Any]) -> None:
        self.buffer.clear()
        self.emit({"type": "input_audio_buffer.cleared"})

    async def on_item_create(self, event: dict[str, Any]) -> None:
        item = event["item"]
        if item.get("type", "message") != "message" or item.get("role") not in ("user", "system", "assistant"):
            raise ValueError("only message items with role user, system or assistant are supported")
        text = "".join(part.get("text") or part.get("transcript") or "" for part in item.get("content", []))
        item_id = item.get("id") or new_id("item")
        self.items.append((item["role"], text))
        view = {"id": item_id, "type": "message", "role": item["role"], "status": "completed",
                "content": item.get("content", [])}
        self.emit({"type": "conversation.item.added", "previous_item_id": self.last_item, "item": view})
        self.emit({"type": "conversation.item.done", "previous_item_id": self.last_item, "item": view})
        self.last_item = item_id

    async def on_response_create(self, event: dict[str, Any]) -> None:
        if self.transcription_only:
            self.error("a transcription session does not create responses", event_id=event.get("event_id"))
            return
        if self.response is not None and not self.response.done():
            self.error("Conversation already has an active response", code="conversation_already_has_active_response",
                       event_id=event.get("event_id"))
            return
        overrides = event.get("response") or {}
        self.start_response(overrides)

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        if self.response is None or self.response.done():
            self.error("no active response to cancel", code="response_cancel_not_active",
                       event_id=event.get("event_id"))
            return
        self.response.cancel()

    # ---- a user turn: commit -> transcript -> response ---------------------------------------

    def commit(self, item_id: str) -> None:
        audio = bytes(self.buffer)
        self.buffer.clear()
        self.emit({"type": "input_audio_buffer.committed", "previous_item_id": self.last_item, "item_id": item_id})
        view = {"id": item_id, "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        self.emit({"type": "conversation.item.added", "previous_item_id": self.last_item, "item": view})
        self.last_item = item_id
        self.transcribing.add(self.spawn(self.transcribe_turn(item_id, audio, view)))

    async def transcribe_turn(self, item_id: str, audio: bytes, view: dict[str, Any]) -> None:
        task = asyncio.current_task()
        try:
            await self._transcribe_turn(item_id, audio, view)
        finally:
            if task is not None:
                self.transcribing.discard(task)

    async def _transcribe_turn(self, item_id: str, audio: bytes, view: dict[str, Any]) -> None:
        seconds = len(audio) / (RATE * 2)
        try:
            transcript = await self.transcribe(audio)
        except InferBusError as exc:
            self.emit({"type": "conversation.item.input_audio_transcription.failed", "item_id": item_id,
                       "content_index": 0, "error": {"type": "transcription_error", "code": exc.code,
                                                     "message": exc.message}})
            return
        self.finalized.add(item_id)
        self.emit({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                   "content_index": 0, "transcript": transcript, "usage": {"type": "duration", "seconds": seconds}})
        view["content"][0]["transcript"] = transcript
        self.emit({"type": "conversation.item.done", "item": view})
        self.items.append(("user", transcript))
        # With turn detection the server answers by itself; without (push-to-talk) the client sends
        # response.create, which waits for this transcript.
        td = self.config["audio"]["input"]["turn_detection"]
        idle = self.response is None or self.response.done()
        if td and transcript.strip() and td.get("create_response", True) and idle and not self.transcription_only:
            self.start_response({})

    async def transcribe(self, pcm: bytes) -> str:
        model = self.gw.settings.model_aliases.get(
            self.config["audio"]["input"]["transcription"].get("model", "whisper-tiny-en"), "whisper-tiny-en"
        )
        payload = wav_bytes(downsample_16k(pcm), 16_000)
        if len(payload) > INLINE_MAX:
            raise InferBusError("invalid_request", "this turn is too long to transcribe (over ~16 s of speech)")
        request = TranscribeRequest(request_id=new_id("rt-asr"), model=model, audio=payload, filename="turn.wav")
        route = self.gw.catalogue.route(model, "asr")
        text = ""
        async for chunk in self.stream(route.subject, asr_encoder.encode(request), request.request_id, "asr",
                                       (Transcript,)):
            if isinstance(chunk, Transcript):
                text = chunk.text.strip()
        return text

    def stream(self, subject: str, payload: bytes, request_id: str, kind: str,
               terminal: tuple[type, ...]) -> AsyncGenerator[Any, None]:
        decoder = asr_chunk_decoder if kind == "asr" else tts_chunk_decoder
        return self.gw.dispatcher.client.open(
            subject, payload, request_id, decoder=decoder, terminal=terminal, what=f"the {kind} model",
            deadline=time.time() + 120, extra_headers=self.gw.bus_headers(None, self.key),
        )

    # ---- a response: LLM tokens -> sentences -> TTS audio ------------------------------------

    def start_response(self, overrides: dict[str, Any]) -> None:
        self.response = self.spawn(self.respond(overrides))

    async def respond(self, overrides: dict[str, Any]) -> None:
        waiting = [t for t in self.transcribing if not t.done()]
        if waiting:  # a committed turn is part of this response's prompt
            await asyncio.gather(*waiting, return_exceptions=True)
        response_id, item_id = new_id("resp"), new_id("item")
        modalities = overrides.get("output_modalities") or self.config["output_modalities"]
        audio_out = "audio" in modalities
        shell = {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": [],
                 "output_modalities": modalities}
        self.emit({"type": "response.created", "response": shell})
        item: dict[str, Any] = {
            "id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []
        }
        self.emit({"type": "response.output_item.added", "response_id": response_id, "output_index": 0, "item": item})
        part_type = "audio" if audio_out else "text"
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        self.emit({"type": "response.content_part.added", **where, "part": {"type": part_type}})
        text: list[str] = []
        usage = {"input_tokens": 0, "output_tokens": 0}
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = self.spawn(self.speak(sentences, where)) if audio_out else None
        status, reason = "completed", None
        tokens = self.generate(overrides)
        try:
            pending = ""
            async for chunk in tokens:
                if isinstance(chunk, Delta) and chunk.text:
                    text.append(chunk.text)
                    kind = "response.output_audio_transcript.delta" if audio_out else "response.output_text.delta"
                    self.emit({"type": kind, **where, "delta": chunk.text})
                    if speaker is not None:
                        done, pending = split_sentences(pending + chunk.text)
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
            self.error(exc.message, code="server_error" if exc.http_status >= 500 else exc.code)
        finally:
            await tokens.aclose()  # at once: the LLM worker hears the cancel
            if speaker is not None and not speaker.done():
                speaker.cancel()  # closes its TTS stream: the worker hears the cancel
                await asyncio.gather(speaker, return_exceptions=True)
        transcript = "".join(text)
        if transcript:
            self.items.append(("assistant", transcript))
        if audio_out:
            self.emit({"type": "response.output_audio_transcript.done", **where, "transcript": transcript})
            self.emit({"type": "response.output_audio.done", **where})
        else:
            self.emit({"type": "response.output_text.done", **where, "text": transcript})
        part: dict[str, Any] = {"type": part_type, ("transcript" if audio_out else "text"): transcript}
        self.emit({"type": "response.content_part.done", **where, "part": part})
        item = {**item, "status": "completed" if status == "completed" else "incomplete", "content": [part]}
        self.emit({"type": "response.output_item.done", "response_id": response_id, "output_index": 0, "item": item})
        self.last_item = item_id
        total = usage["input_tokens"] + usage["output_tokens"]
        self.emit({"type": "response.done", "response": {
            **shell, "status": status, "output": [item],
            "status_details": {"type": status, "reason": reason} if reason else None,
            "usage": {"total_tokens": total, "input_tokens": usage["input_tokens"],
                      "output_tokens": usage["output_tokens"],
                      "input_token_details": {"text_tokens": usage["input_tokens"], "audio_tokens": 0},
                      "output_token_details": {"text_tokens": usage["output_tokens"], "audio_tokens": 0}},
        }})

    async def generate(self, overrides: dict[str, Any]) -> AsyncGenerator[Any, None]:
        cfg = self.config
        messages = [Message("system", overrides.get("instructions") or cfg["instructions"])]
        messages += [Message(role, content) for role, content in self.items[-20:]]
        model = self.gw.settings.model_aliases.get(cfg["model"], cfg["model"])
        request = GenerateRequest(request_id=new_id("rt-llm"), model=model, messages=messages,
                                  max_tokens=int(overrides.get("max_output_tokens") or cfg["max_output_tokens"]),
                                  temperature=float(overrides.get("temperature", cfg["temperature"])))
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

    async def speak(self, sentences: asyncio.Queue[str | None], where: dict[str, Any]) -> None:
        out = self.config["audio"]["output"]
        model = self.gw.settings.model_aliases.get(out.get("model", "hibari"), "hibari")
        index = 0
        while (sentence := await sentences.get()) is not None:
            request = SpeechRequest(request_id=new_id(f"rt-tts{index}"), model=model, input=sentence)
            index += 1
            route = self.gw.catalogue.route(model, "tts")
            chunks = self.stream(route.subject, asr_encoder.encode(request), request.request_id, "tts",
                                 (SpeechDoneChunk,))
            try:
                async for chunk in chunks:
                    if isinstance(chunk, AudioChunk):
                        self.emit({"type": "response.output_audio.delta", **where,
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
    key = await gw.keys.authenticate(_key_from(request)) if gw.keys else None
    assert key is not None
    model = request.query.get("model") or "smollm2-135m-instruct"
    model = gw.settings.model_aliases.get(model, model)
    key.authorize("llm", model)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    ws = web.WebSocketResponse(protocols=("realtime",) if "realtime" in protocols else (), heartbeat=20)
    await ws.prepare(request)
    session = Session(gw, ws, key, model, beta="realtime=v1" in request.headers.get("OpenAI-Beta", ""))
    if request.query.get("intent") == "transcription":  # OpenAI's transcription sessions: dictation
        session.transcription_only = session.partials = True
        session.config["type"] = "transcription"
    writer = asyncio.create_task(session.writer())
    session.emit({"type": "session.created", "session": session.config})
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await session.handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                session.error("send JSON text events; audio goes base64 in input_audio_buffer.append")
    finally:
        await session.close()
        await writer
    return ws
