"""Any container PyAV reads (wav, mp3, flac, ogg, webm, ...) as 16 kHz mono float32, refused when too long."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from contracts.errors import invalid

SAMPLE_RATE = 16_000
Audio = npt.NDArray[np.float32]


def decode(data: bytes, max_seconds: float, filename: str = "audio") -> Audio:
    """The file's first audio stream, resampled; a client error (invalid_request) for anything else."""
    if not data:
        raise invalid(f"The audio file {filename!r} is empty", "file")
    try:
        return _decode(data, max_seconds, filename)
    except av.error.FFmpegError as exc:
        raise invalid(
            f"Could not decode {filename!r} as audio ({exc.strerror or type(exc).__name__}). "
            "Supported formats: flac, m4a, mp3, mp4, mpeg, mpga, oga, ogg, wav, webm",
            "file",
        ) from None


def _decode(data: bytes, max_seconds: float, filename: str) -> Audio:
    limit = int(max_seconds * SAMPLE_RATE)
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise invalid(
                f"{filename!r} has no audio stream (read as {container.format.name}): send an audio file", "file"
            )
        declared = container.duration  # microseconds, from the header: may be absent or wrong
        if declared is not None and declared / 1e6 > max_seconds + 1:
            raise _too_long(declared / 1e6, max_seconds)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        parts: list[npt.NDArray[Any]] = []  # s16 mono
        samples = 0
        for frame in _frames(container):
            frame.pts = None  # resample by sample count, not by (possibly broken) timestamps
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
                samples += parts[-1].size
            if samples > limit:
                raise _too_long(samples / SAMPLE_RATE, max_seconds)
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(-1))
            samples += parts[-1].size
    if samples > limit:
        raise _too_long(samples / SAMPLE_RATE, max_seconds)
    if samples == 0:
        raise invalid(f"{filename!r} holds no audio samples", "file")
    return np.concatenate(parts).astype(np.float32) / 32768.0


def _frames(container: av.container.InputContainer) -> Iterator[av.AudioFrame]:
    """Decoded frames of the first audio stream; a corrupt packet is skipped, as ffmpeg does."""
    frames = container.decode(audio=0)
    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


def _too_long(seconds: float, max_seconds: float) -> Exception:
    return invalid(f"The audio is longer than {max_seconds:g} s (at least {seconds:.1f} s): split it", "file")


def duration(audio: Audio) -> float:
    return float(audio.size) / SAMPLE_RATE
