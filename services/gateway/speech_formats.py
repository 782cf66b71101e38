"""Response formats of /v1/audio/speech: 16-bit mono PCM in, each format's bytes out as soon as they exist.

pcm and wav are written as they come (wav with a streaming header: sizes unknown, 0xFFFFFFFF); mp3,
opus (Ogg), aac (ADTS) and flac are encoded incrementally with PyAV into a sink that never seeks,
so every muxed packet can go out at once.
"""

from __future__ import annotations

import struct
from typing import Any, Final, Literal, Protocol, cast

from contracts.errors import InferBusError
from contracts.speech import PCM_WIDTH

try:  # imported with the gateway, not on the first mp3 request (~0.5 s)
    import av
    import numpy as np
    from av.audio.fifo import AudioFifo

    HAVE_AV = True
except ImportError:  # no speech extra: wav and pcm still work
    HAVE_AV = False

Format = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
FORMATS: Final = ("mp3", "opus", "aac", "flac", "wav", "pcm")
CONTENT_TYPES: Final[dict[str, str]] = {  # as OpenAI sends them: opus is Ogg Opus
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
UNKNOWN_SIZE: Final = 0xFFFFFFFF


class AudioEncoder(Protocol):
    blocking: bool  # True: feed/finish do real work; call them off the event loop

    def feed(self, pcm: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class PcmEncoder:
    blocking = False

    def feed(self, pcm: bytes) -> bytes:
        return pcm

    def finish(self) -> bytes:
        return b""


class WavEncoder:
    """A RIFF/WAVE header whose sizes say "unknown" (read to the end), then the PCM as it comes."""

    blocking = False

    def __init__(self, sample_rate: int) -> None:
        self.header: bytes | None = wav_header(sample_rate)

    def feed(self, pcm: bytes) -> bytes:
        head, self.header = self.header or b"", None
        return head + pcm

    def finish(self) -> bytes:
        return self.feed(b"")


def wav_header(sample_rate: int, data_bytes: int = UNKNOWN_SIZE) -> bytes:
    riff = UNKNOWN_SIZE if data_bytes == UNKNOWN_SIZE else 36 + data_bytes
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * PCM_WIDTH, PCM_WIDTH, 8 * PCM_WIDTH)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack(
        "<I", data_bytes
    )


class _Sink:
    """What the muxer writes, collected until taken. No seek: the muxer treats it as a live stream."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


# format -> (container, codec, sample format the codec takes, bit rate, container options)
_CODECS: Final[dict[str, tuple[str, str, str, int, dict[str, str]]]] = {
    "mp3": ("mp3", "libmp3lame", "s16p", 64_000, {}),
    "opus": ("ogg", "libopus", "s16", 32_000, {"page_duration": "100000"}),  # an Ogg page per 100 ms
    "aac": ("adts", "aac", "fltp", 64_000, {}),
    "flac": ("flac", "flac", "s16", 0, {}),
}


class PyAVEncoder:
    blocking = True

    def __init__(self, fmt: str, sample_rate: int) -> None:
        if not HAVE_AV:
            raise InferBusError(
                "unsupported_parameter",
                f"response_format {fmt!r} needs PyAV on the gateway (the speech extra); use wav or pcm",
                param="response_format",
            )
        container, codec, sample_format, bit_rate, options = _CODECS[fmt]
        self.rate = sample_rate
        self.sink = _Sink()
        self.container: Any = av.open(
            self.sink, "w", format=container, container_options={"flush_packets": "1", **options}
        )
        self.stream: Any = cast(Any, self.container.add_stream(codec, rate=sample_rate, layout="mono"))
        if bit_rate:
            self.stream.bit_rate = bit_rate
        self.stream.format = sample_format
        self.resampler: Any = av.AudioResampler(format=sample_format, layout="mono", rate=sample_rate)
        self.fifo: Any = AudioFifo()

    def feed(self, pcm: bytes) -> bytes:
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.rate
        for converted in self.resampler.resample(frame):
            self.fifo.write(converted)
        size = self.stream.codec_context.frame_size or 1024
        while self.fifo.samples >= size:
            self._encode(self.fifo.read(size))
        return self.sink.take()

    def finish(self) -> bytes:
        rest = self.fifo.read()
        if rest is not None:
            self._encode(rest)
        self._encode(None)
        self.container.close()
        return self.sink.take()

    def _encode(self, frame: Any) -> None:
        for packet in self.stream.encode(frame):
            self.container.mux(packet)


def encoder_for(fmt: str, sample_rate: int) -> AudioEncoder:
    if fmt == "pcm":
        return PcmEncoder()
    if fmt == "wav":
        return WavEncoder(sample_rate)
    return PyAVEncoder(fmt, sample_rate)


def content_type(fmt: str) -> str:
    """OpenAI's Content-Type for each format (pcm's sample rate is in x-inferbus-sample-rate)."""
    return CONTENT_TYPES[fmt]
