"""Speech on the bus: ASR (audio in, transcript out) and TTS (text in, audio out).

Both ride the same streaming protocol as LLM generations (`infer.<asr|tts>.<model>.<version>`, an
Accepted chunk first, Heartbeats while waiting, exactly one terminal chunk or an ErrorChunk, `seq`
without gaps) and reuse Accepted, Heartbeat and ErrorChunk from contracts.llm. Audio is raw bytes in
msgpack (never base64 in JSON) and no message exceeds the server's max payload: a request carries
at most INLINE_MAX bytes of audio itself, larger files go through the JetStream object store
(MEDIA_BUCKET, named by request id), and TTS audio comes back in chunks of at most AUDIO_CHUNK bytes.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec
from msgspec import Struct

from contracts.llm import Accepted, Attempt, Bundle, ErrorChunk, Heartbeat

MEDIA_BUCKET: Final = "INFERBUS_MEDIA"
INLINE_MAX: Final = 512 * 1024
AUDIO_CHUNK: Final = 32 * 1024
MAX_SPEAKERS: Final = 4  # known speakers per request
REFERENCES_MAX: Final = 512 * 1024  # their reference clips together (the audio then goes by the object store)
PCM_WIDTH: Final = 2  # bytes per sample: TTS workers send 16-bit little-endian mono PCM


# ---- ASR -------------------------------------------------------------------------------------


class TranscribeRequest(Struct, frozen=True, kw_only=True, omit_defaults=True):
    request_id: str
    model: str
    task: Literal["transcribe", "translate"] = "transcribe"
    audio: bytes | None = None  # the file itself, when at most INLINE_MAX bytes
    object_name: str | None = None  # else its name in MEDIA_BUCKET
    filename: str = "audio"
    language: str | None = None  # ISO-639-1; None: detect
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False
    attempt: Attempt = 0  # see contracts.llm.GenerateRequest
    beam_size: int | None = None  # 1 (greedy) to 10; None: the worker's default
    # Speaker diarization: Segments carry `speaker`. Known speakers: names and, in the same order, short
    # reference clips (audio files, 1-10 s each; at most MAX_SPEAKERS, REFERENCES_MAX bytes together).
    diarize: bool = False
    speaker_names: list[str] = msgspec.field(default_factory=list)
    speaker_references: list[bytes] = msgspec.field(default_factory=list)
    vad_threshold: float | None = None  # chunking_strategy server_vad: speech threshold (0-1)
    vad_silence_ms: int | None = None  # ... and the silence that separates speech regions


class Word(Struct, frozen=True, array_like=True):
    start: float
    end: float
    word: str
    probability: float


class Segment(Struct, frozen=True, tag="s", array_like=True):
    seq: int
    id: int
    start: float
    end: float
    text: str
    words: list[Word]
    avg_logprob: float
    no_speech_prob: float
    speaker: str | None = None  # with diarize: who speaks (a known name, else "A", "B", ...)


class Transcript(Struct, frozen=True, tag="t", array_like=True):
    """Terminal: the whole text; `duration` (seconds of audio) is what usage counts."""

    seq: int
    text: str
    language: str
    duration: float
    version: str


AsrChunk = Accepted | Heartbeat | Segment | Transcript | ErrorChunk | Bundle


# ---- TTS -------------------------------------------------------------------------------------


class SpeechRequest(Struct, frozen=True, kw_only=True, omit_defaults=True):
    request_id: str
    model: str
    input: str
    voice: str | None = None  # None: the engine's default voice
    speed: float = 1.0
    attempt: Attempt = 0  # see contracts.llm.GenerateRequest
    instructions: str | None = None  # speaking style (services/speech/tts/style.py's vocabulary)


class AudioChunk(Struct, frozen=True, tag="au", array_like=True):
    """16-bit mono PCM at `sample_rate`, in order; `sentence` says which sentence it belongs to."""

    seq: int
    pcm: bytes
    sample_rate: int
    sentence: int


class SpeechDone(Struct, frozen=True, tag="sd", array_like=True):
    """Terminal: characters synthesized and seconds of audio produced (what usage counts)."""

    seq: int
    characters: int
    audio_seconds: float
    version: str


TtsChunk = Accepted | Heartbeat | AudioChunk | SpeechDone | ErrorChunk | Bundle

asr_encoder = msgspec.msgpack.Encoder()
asr_request_decoder = msgspec.msgpack.Decoder(TranscribeRequest)
asr_chunk_decoder = msgspec.msgpack.Decoder(AsrChunk)
tts_request_decoder = msgspec.msgpack.Decoder(SpeechRequest)
tts_chunk_decoder = msgspec.msgpack.Decoder(TtsChunk)
