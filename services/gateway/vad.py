"""Turn detection for /v1/realtime: Silero VAD on a streaming 32 ms window, an energy detector as the fallback.

Silero VAD v6 (MIT) runs with onnxruntime, no torch: its ONNX file ships inside the faster-whisper wheel
(the `speech` extra), so nothing is downloaded. One model serves every session of the gateway (each
session keeps its own LSTM state); a call costs ~0.06 ms per 32 ms of audio here, batched over what
one append completes. Without onnxruntime or that file the energy detector takes over (and says so).

Both detectors take pcm16 mono 24 kHz as the client sends it and report events at stream offsets
(bytes of that audio since the session began): `start` (speech began), `pause` (PAUSE_MS of silence
within speech, at the moment it is known: where speculative work may start), `resume` (speech again
after a pause, at the pause's middle: where a dictation window is cut), `stop` (`silence_duration_ms` of
silence: the turn ended; its offset is where the silence reached that length).
"""

from __future__ import annotations

import importlib.util
import math
from array import array
from collections import deque
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from services.runtime import logging as log

RATE = 24_000
BYTES_PER_MS = RATE * 2 // 1000
PAUSE_MS = 160  # silence within speech long enough to start speculative work, or cut a dictation window
SILERO_CHUNK = 512  # samples at 16 kHz: 32 ms, the window Silero v5/v6 is trained on
SILERO_CONTEXT = 64  # samples of the previous window the model sees with each one
SILERO_START_CHUNKS = 2  # 64 ms of speech before a turn starts: a click or a cough does not barge in
ENERGY_FRAME = RATE * 2 // 50  # 20 ms of pcm16

Kind = Literal["start", "pause", "resume", "stop"]


class VadEvent(NamedTuple):
    kind: Kind
    at: int  # stream offset (bytes of 24 kHz pcm16)


class Detector(Protocol):
    speaking: bool
    name: str

    def feed(self, pcm: bytes) -> list[VadEvent]: ...

    def pending(self) -> int:
        """Bytes before the end of the stream that a turn detected in the next window would reach back into."""
        ...

    def quietest(self) -> int:
        """The stream offset of the quietest moment of the last 300 ms (where a long window is cut)."""
        ...

    def quiet_ms(self) -> int:
        """How long the speaker has been silent (0 while speaking or while nobody speaks)."""
        ...

    def end(self) -> None:
        """The turn ends here whatever the audio does (a commit, or semantic turn detection decided)."""
        ...


class Thresholds(NamedTuple):
    threshold: float  # 0..1
    silence_ms: int  # end of turn after this much silence
    pause_ms: int = PAUSE_MS


def silero_path() -> Path | None:
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), "assets", "silero_vad_v6.onnx")
    return path if path.is_file() else None


_MODEL: Any = None
_TRIED = False


def silero_model() -> Any:
    """The process's Silero ONNX session (built once), or None where onnxruntime or the weights are missing."""
    global _MODEL, _TRIED
    if _TRIED:
        return _MODEL
    _TRIED = True
    path = silero_path()
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if path is None or ort is None:
        log.get("realtime").warning("silero_vad_unavailable", fallback="energy",
                                    hint="install the speech extra (faster-whisper, onnxruntime)")
        return None
    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    _MODEL = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], sess_options=options)
    return _MODEL


def create(limits: Thresholds, origin: int, engine: str = "silero") -> Detector:
    """A detector whose first audio is at stream offset `origin`: Silero when it can run, else energy."""
    model = silero_model() if engine == "silero" else None
    if model is not None:
        return SileroVad(model, limits, origin)
    return EnergyVad(limits, origin)


def to_16k(pcm: bytes) -> np.ndarray:
    """24 kHz pcm16 (a multiple of 3 samples) -> 16 kHz float32: of every 3 samples, the first and the mean of two."""
    s = np.frombuffer(pcm, "<i2").astype(np.float32).reshape(-1, 3) / 32768.0
    return np.stack([s[:, 0], (s[:, 1] + s[:, 2]) * 0.5], axis=1).reshape(-1)


class _Runs:
    """The state machine both detectors share: start run, silence run, pause, resume, stop; offsets in bytes."""

    def __init__(self, limits: Thresholds, step_bytes: int, start_steps: int) -> None:
        step_ms = step_bytes / BYTES_PER_MS
        self.step = step_bytes
        self.start_steps = start_steps
        self.pause_steps = max(1, math.ceil(limits.pause_ms / step_ms))
        self.silence_steps = max(1, math.ceil(limits.silence_ms / step_ms))
        self.speaking = False
        self.voiced = 0
        self.quiet = 0
        self.paused = False

    def step_to(self, speech: bool, silent: bool, end: int, events: list[VadEvent]) -> None:
        """One window that ends at stream offset `end`: speech, clear silence, or neither (counts as silence
        once a silence began: the hysteresis Silero's own iterator applies)."""
        if speech:
            self.voiced += 1
            if self.speaking:
                if self.paused:  # at the middle of the pause: where a dictation window is cut
                    events.append(VadEvent("resume", end - self.step - self.quiet * self.step // 2))
                self.quiet, self.paused = 0, False
            elif self.voiced >= self.start_steps:
                self.speaking, self.quiet, self.paused = True, 0, False
                events.append(VadEvent("start", end - self.voiced * self.step))
            return
        self.voiced = 0
        if not self.speaking or not (silent or self.quiet):
            return
        self.quiet += 1
        if self.quiet == self.pause_steps and self.quiet < self.silence_steps:
            self.paused = True
            events.append(VadEvent("pause", end))
        if self.quiet >= self.silence_steps:
            self.end()
            events.append(VadEvent("stop", end))

    def end(self) -> None:
        self.speaking, self.quiet, self.paused, self.voiced = False, 0, False, 0

    def quiet_ms(self) -> int:
        return int(self.quiet * self.step / BYTES_PER_MS) if self.speaking else 0


class SileroVad(_Runs):
    name = "silero"

    def __init__(self, model: Any, limits: Thresholds, origin: int) -> None:
        super().__init__(limits, SILERO_CHUNK * 3, SILERO_START_CHUNKS)  # 512 samples at 16 kHz = 1536 bytes at 24
        self.model = model
        self.threshold = limits.threshold
        self.negative = max(limits.threshold - 0.15, 0.01)
        self.h = np.zeros((1, 1, 128), np.float32)
        self.c = np.zeros((1, 1, 128), np.float32)
        self.context = np.zeros(SILERO_CONTEXT, np.float32)
        self.rest = b""  # 24 kHz bytes not yet a whole window
        self.offset = origin  # stream offset of the first byte of `rest`
        self.recent: deque[tuple[float, int]] = deque(maxlen=10)  # (probability, window end) of the last 320 ms

    def feed(self, pcm: bytes) -> list[VadEvent]:
        data = self.rest + pcm
        whole = len(data) - len(data) % self.step
        self.rest = data[whole:]
        if not whole:
            return []
        windows = to_16k(data[:whole]).reshape(-1, SILERO_CHUNK)
        previous = np.concatenate([self.context[None], windows[:-1, -SILERO_CONTEXT:]])
        batch = np.ascontiguousarray(np.concatenate([previous, windows], axis=1))
        out, self.h, self.c = self.model.run(None, {"input": batch, "h": self.h, "c": self.c})
        self.context = windows[-1, -SILERO_CONTEXT:].copy()
        events: list[VadEvent] = []
        for p in np.asarray(out, np.float32).reshape(-1).tolist():
            self.offset += self.step
            self.recent.append((p, self.offset))
            self.step_to(p >= self.threshold, p < self.negative, self.offset, events)
        return events

    def pending(self) -> int:
        return len(self.rest) + (self.start_steps + 1) * self.step

    def quietest(self) -> int:
        return min(self.recent)[1] if self.recent else self.offset


class EnergyVad(_Runs):
    """Loudness over 20 ms frames: threshold 0..1 maps to -60..-10 dBFS. Noise above it reads as speech."""

    name = "energy"

    def __init__(self, limits: Thresholds, origin: int) -> None:
        super().__init__(limits, ENERGY_FRAME, 3)
        self.level = 32768 * 10 ** ((-60 + 50 * limits.threshold) / 20)
        self.rest = b""
        self.offset = origin
        self.recent: deque[tuple[float, int]] = deque(maxlen=15)

    def feed(self, pcm: bytes) -> list[VadEvent]:
        data = self.rest + pcm
        whole = len(data) - len(data) % self.step
        self.rest = data[whole:]
        events: list[VadEvent] = []
        for offset in range(0, whole, self.step):
            frame = array("h", data[offset : offset + self.step])
            rms = math.sqrt(sum(s * s for s in frame) / len(frame))
            self.recent.append((rms, self.offset))
            self.offset += self.step
            loud = rms >= self.level
            self.step_to(loud, not loud, self.offset, events)
        return events

    def pending(self) -> int:
        return len(self.rest) + self.start_steps * self.step

    def quietest(self) -> int:
        return min(self.recent)[1] if self.recent else self.offset
