"""Speaking style: OpenAI's free-text `instructions` mapped onto what we can really change; inline pauses, emphasis.

What changes (and is measured on the output by tests/test_voice_style.py): speaking rate, pitch, loudness
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

Inline control in `input`, SSML's tags:
- `<break time="500ms"/>` (or `"1.5s"`, up to 5 s) inserts that much silence.
- `<emphasis>words</emphasis>` speaks the words louder and a little slower; `level="strong"` more so,
  `level="reduced"` quieter and a little faster (`moderate`, the default, as SSML). The engines have no
  word-level prosody: the span is synthesized as a phrase of its own, so it also starts and ends like
  one. It applies on top of the request's style (rates multiply, loudness adds; as with the vocabulary,
  louder only as far as the audio does not clip). A `<break/>` may stand inside a span; spans do not nest.

| level | rate | loudness |
|---|---|---|
| strong | x0.85 | +6 dB |
| moderate | x0.9 | +4 dB |
| reduced | x1.05 | -4 dB |
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from contracts.errors import invalid

MAX_BREAK_S = 5.0
_BREAK = re.compile(r"<break\s+time\s*=\s*[\"']?\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*[\"']?\s*/?>", re.IGNORECASE)
_OPEN = re.compile(r"<emphasis(?:\s+level\s*=\s*([\"']?)(strong|moderate|reduced)\1)?\s*>", re.IGNORECASE)
_CLOSE = re.compile(r"<\s*/\s*emphasis\s*>", re.IGNORECASE)
_TAG = re.compile(r"<\s*/?\s*(break|emphasis)\b[^>]*>", re.IGNORECASE)
EMPHASIS = {"strong": (0.85, 6.0), "moderate": (0.9, 4.0), "reduced": (1.05, -4.0)}  # level: (rate, dB)


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


class Emphasis(NamedTuple):
    """Words of an `<emphasis>` span, spoken as `level` says."""

    text: str
    level: str = "moderate"


Piece = str | float | Emphasis


def segments(text: str) -> list[Piece]:
    """`text` as its pieces of text, the pauses (seconds) its `<break time=.../>` tags ask for and the spans
    its `<emphasis>` tags mark; a tag written any other way, nested or left open is refused."""
    out: list[Piece] = []
    level: str | None = None  # inside a span: its level
    at = 0
    for tag in _TAG.finditer(text):
        _spoken(out, text[at : tag.start()], level)
        at = tag.end()
        if (pause := _BREAK.fullmatch(tag.group())) is not None:
            seconds = float(pause.group(1)) / (1000.0 if pause.group(2).lower() == "ms" else 1.0)
            if seconds > MAX_BREAK_S:
                raise invalid(f"a <break> is {MAX_BREAK_S:g} s at most", "input")
            out.append(seconds)
        elif (opening := _OPEN.fullmatch(tag.group())) is not None:
            if level is not None:
                raise invalid("<emphasis> spans do not nest: close one before the next", "input")
            level = (opening.group(2) or "moderate").lower()
        elif _CLOSE.fullmatch(tag.group()) is not None:
            if level is None:
                raise invalid("</emphasis> closes no <emphasis>", "input")
            level = None
        elif tag.group(1).lower() == "break":
            raise invalid('write pauses as <break time="500ms"/> or <break time="1s"/>', "input")
        else:
            raise invalid('write emphasis as <emphasis>words</emphasis>, or with level="strong", "moderate" '
                          'or "reduced"', "input")
    if level is not None:
        raise invalid("an <emphasis> is not closed: end it with </emphasis>", "input")
    _spoken(out, text[at:], None)
    return out


def _spoken(out: list[Piece], text: str, level: str | None) -> None:
    if text.strip():
        out.append(text if level is None else Emphasis(text, level))


def emphasized(style: Style, level: str) -> Style:
    """`style` as an `<emphasis level=...>` span speaks it: rate and loudness change, pitch and pauses do not."""
    rate, gain = EMPHASIS[level]
    return style._replace(rate=min(max(style.rate * rate, 0.5), 2.0),
                          gain_db=min(max(style.gain_db + gain, -20.0), 8.0),
                          words=(*style.words, f"emphasis:{level}"))


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
