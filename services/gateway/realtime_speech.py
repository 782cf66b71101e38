"""Speech helpers for /v1/realtime: pcm16 for the ASR, where an answer is cut for the TTS, finished-sounding text."""

from __future__ import annotations

import io
import re
import wave
from array import array

RATE = 24_000
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_CLAUSE_END = re.compile(r"(?<=[.!?;:,\u2014])\s+|\n+")
MAX_SENTENCE_CHARS = 160  # no punctuation for this long: speak what there is, cut at a space
FIRST_PIECE_WORDS = 6  # the answer's first piece goes to the TTS at its first clause end, or after this many words
_UNFINISHED = frozenset("and but or so because if then that the a an to of with for um uh like my your".split())


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


def whisper_wav(pcm: bytes) -> bytes:
    return wav_bytes(downsample_16k(pcm), 16_000)


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


def first_piece(text: str) -> tuple[str, str] | None:
    """The answer's first piece for the TTS, and the rest: up to the first clause end after two words,
    else the first FIRST_PIECE_WORDS words once a word after them has begun; None while neither is there."""
    for match in _CLAUSE_END.finditer(text):
        head = text[: match.start()].strip()
        if len(head.split()) >= 2:
            return head, text[match.end() :]
    words = list(re.finditer(r"\S+", text))
    if len(words) > FIRST_PIECE_WORDS:  # the next word has begun: the first ones are whole
        cut = words[FIRST_PIECE_WORDS - 1].end()
        return text[:cut].strip(), text[cut:]
    return None


def reads_finished(text: str) -> bool:
    """Whether a transcript sounds like a whole utterance: it ends a sentence, not on "and", "um", "..."."""
    text = text.strip()
    if not text or text.endswith("...") or text[-1] not in ".?!":
        return False
    last = re.sub(r"[^a-z']", "", text.lower().rsplit(None, 1)[-1])
    return last not in _UNFINISHED
