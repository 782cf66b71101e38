"""Speaking style: OpenAI's free-text `instructions` mapped onto what we can really change, and inline pauses.

What changes (and is measured on the output by tests/test_tts_style.py): speaking rate, pitch, loudness
and the pauses between sentences. Pitch is moved by synthesizing at a rate scaled by the pitch ratio and
resampling the result back to its length (formants move with it, as with any such shift: keep it within
a few semitones). Nothing else is claimed: "whisper" makes the voice quiet and slow, not breathy.

The vocabulary (case-insensitive words or phrases in the instructions; several combine, rates and
pitches add up, and the result is clamped):

| words | rate | pitch | loudness | pause after each sentence |
|---|---|---|---|---|
| calm, relaxed, soothing, gentle | x0.9 | -1 st | -3 dB | +250 ms |
| excited, energetic, enthusiastic, cheerful, happy, upbeat | x1.12 | +2 st | +2 dB | — |
| sad, somber, serious, gloomy | x0.9 | -2 st | -2 dB | +150 ms |
| whisper, whispering, whisper-like, quiet, softly, soft | x0.95 | — | -12 dB | — |
| loud, loudly, emphatic, shouting | — | — | +4 dB | — |
| slow, slowly, "slow and clear", clearly, deliberate | x0.8 | — | — | +300 ms |
| fast, quickly, hurried, rapid | x1.25 | — | — | — |
| deep, low-pitched, lower | — | -3 st | — | — |
| high-pitched, higher, bright | — | +3 st | — | — |

Inline control in `input`: `<break time="500ms"/>` (or `"1.5s"`, up to 5 s) inserts that much silence.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from contracts.errors import invalid

MAX_BREAK_S = 5.0
_BREAK = re.compile(r"<break\s+time\s*=\s*[\"']?\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*[\"']?\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"<\s*/?\s*break\b[^>]*>", re.IGNORECASE)


class Style(NamedTuple):
    rate: float = 1.0  # speaking-rate factor (multiplies the request's speed)
    semitones: float = 0.0  # pitch shift
    gain_db: float = 0.0  # loudness change
    pause_s: float = 0.0  # silence added after each sentence
    words: tuple[str, ...] = ()  # the vocabulary words that set it, for the response header

    @property
    def neutral(self) -> bool:
        return not self.words

    def describe(self) -> str:
        """What was applied, as the x-inferbus-style header says it."""
        if self.neutral:
            return "none"
        return (f"rate={self.rate:.2f}; pitch={self.semitones:+.1f}st; gain={self.gain_db:+.1f}dB; "
                f"pause={self.pause_s * 1000:.0f}ms; from={','.join(self.words)}")


class _Entry(NamedTuple):
    rate: float
    semitones: float
    gain_db: float
    pause_s: float


VOCABULARY: dict[str, _Entry] = {}
for _words, _entry in (
    ("calm relaxed soothing gentle", _Entry(0.9, -1.0, -3.0, 0.25)),
    ("excited energetic enthusiastic cheerful happy upbeat", _Entry(1.12, 2.0, 2.0, 0.0)),
    ("sad somber serious gloomy", _Entry(0.9, -2.0, -2.0, 0.15)),
    ("whisper whispering whisper-like quiet softly soft", _Entry(0.95, 0.0, -12.0, 0.0)),
    ("loud loudly emphatic shouting", _Entry(1.0, 0.0, 4.0, 0.0)),
    ("slow slowly clearly deliberate slow-and-clear", _Entry(0.8, 0.0, 0.0, 0.3)),
    ("fast quickly hurried rapid", _Entry(1.25, 0.0, 0.0, 0.0)),
    ("deep low-pitched lower", _Entry(1.0, -3.0, 0.0, 0.0)),
    ("high-pitched higher bright", _Entry(1.0, 3.0, 0.0, 0.0)),
):
    for _word in _words.split():
        VOCABULARY[_word] = _entry


def parse(instructions: str | None) -> Style:
    """The style the vocabulary words in `instructions` ask for (neutral when none is there)."""
    if not instructions:
        return Style()
    text = re.sub(r"\bslow and clear\b", "slow-and-clear", instructions.lower())
    found: list[str] = []
    for word in re.findall(r"[a-z]+(?:-[a-z]+)*", text):
        if word in VOCABULARY and word not in found:
            found.append(word)
    if not found:
        return Style()
    rate, semitones, gain, pause = 1.0, 0.0, 0.0, 0.0
    for word in found:
        entry = VOCABULARY[word]
        rate *= entry.rate
        semitones += entry.semitones
        gain += entry.gain_db
        pause = max(pause, entry.pause_s)
    return Style(min(max(rate, 0.5), 2.0), min(max(semitones, -6.0), 6.0), min(max(gain, -20.0), 8.0), pause,
                 tuple(found))


def segments(text: str) -> list[str | float]:
    """`text` as its pieces of text and the pauses (seconds) its `<break time=.../>` tags ask for."""
    out: list[str | float] = []
    at = 0
    for match in _BREAK.finditer(text):
        if text[at : match.start()].strip():
            out.append(text[at : match.start()])
        seconds = float(match.group(1)) / (1000.0 if match.group(2).lower() == "ms" else 1.0)
        if seconds > MAX_BREAK_S:
            raise invalid(f"a <break> is {MAX_BREAK_S:g} s at most", "input")
        out.append(seconds)
        at = match.end()
    rest = text[at:]
    if _TAG.search(rest) or any(isinstance(p, str) and _TAG.search(p) for p in out):
        raise invalid('write pauses as <break time="500ms"/> or <break time="1s"/>', "input")
    if rest.strip():
        out.append(rest)
    return out


def pitch_ratio(style: Style) -> float:
    return float(2.0 ** (style.semitones / 12.0))


def apply(audio: npt.ArrayLike, style: Style) -> npt.NDArray[np.float32]:
    """Synthesized audio (made at the rate divided by the pitch ratio) shifted in pitch and loudness."""
    samples = np.asarray(audio, np.float32)
    if samples.dtype != np.float32 or np.abs(samples).max(initial=0.0) > 1.5:  # int16 from an engine
        samples = samples / 32768.0
    ratio = pitch_ratio(style)
    if abs(ratio - 1.0) > 1e-3 and samples.size > 1:
        # Read it `ratio` times faster: the pitch rises by `ratio`, the length (already stretched) comes back.
        positions = np.arange(0.0, samples.size - 1, ratio)
        samples = np.interp(positions, np.arange(samples.size), samples).astype(np.float32)
    if style.gain_db:
        samples = samples * np.float32(10 ** (style.gain_db / 20))
        peak = float(np.abs(samples).max(initial=0.0))
        if peak > 0.99:  # louder only as far as it does not clip
            samples = samples * np.float32(0.99 / peak)
    return samples.astype(np.float32)
