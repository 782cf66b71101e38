"""Language routing between ASR models: the bus header a caller sets to have a multilingual worker identify the
language first and hand back, undecoded, the audio in the languages another model serves (whisper-1: English
to tiny.en)."""

from __future__ import annotations

from typing import Final

# Comma-separated ISO-639-1 codes. A worker that finds one of them answers a Transcript with no text, no
# segments and that language (it bills no audio); any other language it transcribes as usual.
HANDOFF_HEADER: Final = "Inferbus-Asr-Handoff"


def parse(value: str | None) -> frozenset[str]:
    return frozenset(code.strip().lower() for code in (value or "").split(",") if code.strip())


def header(languages: frozenset[str]) -> dict[str, str]:
    return {HANDOFF_HEADER: ",".join(sorted(languages))}
