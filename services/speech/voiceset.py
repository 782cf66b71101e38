"""Labelled speech for tests and benchmarks: our own sentences spoken by several voices, speeds and noise levels.

Voices: hibari (the Kokoro-distilled voice in its wheel) and espeak-ng's English voices (Debian's
`espeak-ng`, formant synthesis: very unlike hibari, and unlike anything Whisper was trained on). Noise is
broadband with a low rumble (a fan, traffic), mixed at a signal-to-noise ratio over the speech's power.
Everything is 16 kHz mono float32, deterministic for the same arguments.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

RATE = 16_000
Audio = npt.NDArray[np.float32]

SENTENCES = (
    "Could you turn the kitchen lights down a little before dinner?",
    "My train leaves from the north platform after lunch.",
    "Add a bag of rice and a jar of honey to the shopping list.",
    "The museum closes early on Sundays during the winter.",
    "Please call my sister and tell her I will be late.",
    "How far is the nearest pharmacy from here?",
    "We painted the fence green because the neighbors asked us to.",
    "Set a timer and remind me to check the oven soon.",
    "What time does the bakery open tomorrow?",
    "The old bridge was repaired after the storm last autumn.",
    "I would like a window seat on the morning flight to Lisbon.",
    "Read me the weather forecast for the weekend.",
    "The cat slept on the warm blanket by the fireplace.",
    "Send the report to the whole team before the meeting starts.",
    "Is there a quiet place to study near the station?",
    "Our neighbors planted roses along the garden wall.",
)


class Voice(NamedTuple):
    engine: str  # "hibari" | "espeak"
    name: str  # espeak-ng voice (with variant), or hibari's voice
    rate: float  # hibari: speed factor; espeak: words per minute
    pitch: int = 50  # espeak: 0-99


VOICES = (
    Voice("hibari", "heart", 1.0),
    Voice("espeak", "en-us", 165),
    Voice("hibari", "heart", 1.25),
    Voice("espeak", "en-gb-x-rp+m3", 180, 35),
    Voice("espeak", "en-us+f3", 150, 70),
    Voice("hibari", "heart", 0.85),
    Voice("espeak", "en-gb-scotland+m1", 195, 45),
)
CONDITIONS = ("clean", "snr20", "snr10")


class Clip(NamedTuple):
    text: str
    voice: Voice
    condition: str  # "clean" or "snr<dB>"
    audio: Audio


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def wav(audio: Audio, rate: int) -> bytes:
    """Mono float audio as a 16-bit WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def resample(data: bytes) -> Audio:
    """A WAV file at any rate as 16 kHz float32 (PyAV's resampler, as the ASR worker decodes uploads)."""
    from services.speech.asr.audio import decode

    return decode(data, 3600.0, "speech.wav")


_HIBARI: dict[str, object] = {}


def speak(text: str, voice: Voice) -> Audio:
    """`text` in `voice`, 16 kHz, the synthesizer's own leading and trailing silence trimmed."""
    if voice.engine == "hibari":
        from hibari import SAMPLE_RATE, Hibari

        model = _HIBARI.get(voice.name) or _HIBARI.setdefault(voice.name, Hibari(voice=voice.name))
        audio = resample(wav(np.asarray(model(text, speed=voice.rate), np.float32), int(SAMPLE_RATE)))  # type: ignore[operator]
    else:
        out = subprocess.run(
            ["espeak-ng", "-v", voice.name, "-s", str(int(voice.rate)), "-p", str(voice.pitch), "--stdout", text],
            capture_output=True, check=True,
        ).stdout
        audio = resample(out)
    voiced = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[voiced[0] : voiced[-1] + 1] if voiced.size else audio


def noise(samples: int, seed: int) -> Audio:
    """Broadband noise with a low rumble, unit RMS."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(samples).astype(np.float32)
    out = np.convolve(white, np.ones(48, np.float32) / 6, mode="same") + 0.5 * white
    scaled: Audio = (out / np.sqrt(np.mean(out**2) + 1e-12)).astype(np.float32)
    return scaled


def mix(audio: Audio, snr_db: float, seed: int = 0) -> Audio:
    """`audio` with noise `snr_db` below its power."""
    power = float(np.mean(audio**2))
    mixed: Audio = (audio + noise(audio.size, seed) * np.sqrt(power / 10 ** (snr_db / 10))).astype(np.float32)
    return mixed


def build(count: int | None = None) -> list[Clip]:
    """One clip per sentence (the first `count`), voices and noise conditions taken in turn.

    Without espeak-ng only hibari's voices are used (at their three speeds)."""
    voices = VOICES if espeak_available() else tuple(v for v in VOICES if v.engine == "hibari")
    clips = []
    for i, text in enumerate(SENTENCES[:count]):
        voice = voices[i % len(voices)]
        condition = CONDITIONS[i % len(CONDITIONS)]
        audio = speak(text, voice)
        if condition != "clean":
            audio = mix(audio, float(condition[3:]), seed=i)
        clips.append(Clip(text, voice, condition, audio))
    return clips


# A conversation of three voices with known boundaries, for diarization.
SPEAKERS = {
    "ann": Voice("hibari", "heart", 1.0),
    "ben": Voice("espeak", "en-us+m3", 160, 40),
    "cyd": Voice("espeak", "en-gb-x-rp+f3", 170, 70),
}
CONVERSATION = (
    ("ann", "Good morning, did you finish the report for the meeting?"),
    ("ben", "Almost, I still need the numbers from the sales team."),
    ("cyd", "I can send those over right after lunch."),
    ("ann", "Great, then we can review everything this afternoon."),
    ("ben", "Sounds good. Should we invite the new manager too?"),
    ("cyd", "Yes, she asked to join the next review."),
    ("ann", "Perfect, I will book the large room."),
)


class Spoken(NamedTuple):
    audio: Audio
    turns: list[tuple[float, float, str]]  # (start, end, speaker) in seconds

    @property
    def duration(self) -> float:
        return self.audio.size / RATE


def conversation(gap_s: float = 0.4, lines: Sequence[tuple[str, str]] = CONVERSATION,
                 speakers: Mapping[str, Voice] | None = None) -> Spoken:
    """`lines` (who, text; CONVERSATION by default) spoken in turn by `speakers`' voices (SPEAKERS by default;
    espeak-ng needed for theirs), `gap_s` of silence after each line."""
    voices = SPEAKERS if speakers is None else speakers
    parts: list[Audio] = []
    turns: list[tuple[float, float, str]] = []
    at = 0.0
    for who, text in lines:
        audio = speak(text, voices[who])
        turns.append((at, at + audio.size / RATE, who))
        parts += [audio, np.zeros(int(gap_s * RATE), np.float32)]
        at += audio.size / RATE + gap_s
    return Spoken(np.concatenate(parts), turns)
