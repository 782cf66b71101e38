"""Speaker diarization through the openai SDK: diarized_json on a conversation of three voices with known
boundaries (its diarization error rate asserted), known speakers named from reference clips, speaker labels
on verbose_json, and bad speaker fields refused.

The voices are hibari's and two of espeak-ng's (Debian's `espeak-ng`, which `make test` installs).
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai import AsyncOpenAI, BadRequestError

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess
from services.speech import voiceset
from services.speech.asr.diarize import Turn, error_rate
from tests.conftest import ADMIN_KEY, Gateway
from tests.test_realtime import wait_ready


class Conversation:
    """voiceset's three-voice conversation, as a WAV upload and its true turns."""

    def __init__(self) -> None:
        spoken = voiceset.conversation()
        self.truth = [Turn(*t) for t in spoken.turns]
        self.wav = voiceset.wav(spoken.audio, voiceset.RATE)
        self.duration = spoken.duration


def data_url(who: str, text: str) -> str:
    clip = voiceset.speak(text, voiceset.SPEAKERS[who])
    return "data:audio/wav;base64," + base64.b64encode(voiceset.wav(clip, voiceset.RATE)).decode()


@pytest.fixture(scope="module")
def conversation() -> Conversation:
    assert shutil.which("espeak-ng"), "espeak-ng is needed for the voices (apt-get install espeak-ng)"
    return Conversation()


@pytest.fixture(scope="module")
async def asr(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[dict[str, Any]]:
    proc = ServiceProcess("asr", "services.speech.asr", infra.env(), infra.root)
    try:
        stats = await wait_ready(nc, "inferbus-asr", proc)
        yield stats
    finally:
        proc.stop()


def client(gateway: Gateway) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY)


def turns_of(segments: list[Any]) -> list[Turn]:
    return [Turn(s.start, s.end, s.speaker) for s in segments]


async def test_diarized_json_labels_three_voices(
    gateway: Gateway, asr: dict[str, Any], conversation: Conversation
) -> None:
    assert asr["diarization"] is True
    result = await client(gateway).audio.transcriptions.create(
        model="whisper-1", file=("talk.wav", conversation.wav), response_format="diarized_json",
        chunking_strategy="auto",
    )
    assert result.task == "transcribe" and "report" in result.text.lower()
    assert {s.speaker for s in result.segments} == {"A", "B", "C"}
    assert all(s.type == "transcript.text.segment" and s.text for s in result.segments)
    assert next(s.speaker for s in result.segments) == "A"  # letters in order of first appearance
    der = error_rate(conversation.truth, turns_of(result.segments), conversation.duration)
    # Segments span words (not the pauses between them): a few percent of the reference is "missed" by that.
    assert der <= 0.15, der


async def test_known_speakers_are_named_from_their_reference_clips(
    gateway: Gateway, asr: dict[str, Any], conversation: Conversation
) -> None:
    result = await client(gateway).audio.transcriptions.create(
        model="whisper-1", file=("talk.wav", conversation.wav), response_format="diarized_json",
        known_speaker_names=["cyd", "ben"],
        known_speaker_references=[data_url("cyd", "This is my voice, recorded for the reference clip."),
                                  data_url("ben", "Hello, it is me, speaking a few words for the record.")],
        chunking_strategy={"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 250},
    )
    named = {s.speaker for s in result.segments}
    assert {"cyd", "ben"} <= named and "A" in named, named  # ann has no reference: a letter
    truth = {t.speaker: t for t in conversation.truth}
    right = total = 0.0
    for segment in result.segments:
        middle = (segment.start + segment.end) / 2
        expected = next((t.speaker for t in conversation.truth if t.start <= middle <= t.end), None)
        if expected is None:
            continue
        length = segment.end - segment.start
        total += length
        right += length * (segment.speaker == (expected if expected in ("cyd", "ben") else "A"))
    assert truth and right / total >= 0.9, (right, total, [(s.speaker, s.start) for s in result.segments])


async def test_verbose_json_carries_speakers_when_asked(
    gateway: Gateway, asr: dict[str, Any], conversation: Conversation
) -> None:
    result = await client(gateway).audio.transcriptions.create(
        model="whisper-1", file=("talk.wav", conversation.wav), response_format="verbose_json",
        extra_body={"diarize": "true"},
    )
    speakers = [s.model_extra.get("speaker") for s in result.segments or []]
    assert set(speakers) == {"A", "B", "C"}, speakers
    plain = await client(gateway).audio.transcriptions.create(
        model="whisper-1", file=("talk.wav", conversation.wav), response_format="verbose_json",
    )
    assert all("speaker" not in (s.model_extra or {}) for s in plain.segments or [])


async def test_bad_speaker_fields_are_refused(
    gateway: Gateway, asr: dict[str, Any], conversation: Conversation
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"known_speaker_names": ["ann"]}, "known_speaker_references"),  # a name without a clip
        ({"known_speaker_names": ["ann"], "known_speaker_references": ["not a data url"]}, "known_speaker_references"),
        ({"chunking_strategy": {"type": "server_vad", "threshold": 3}}, "chunking_strategy"),
    ]
    for extra, param in cases:
        with pytest.raises(BadRequestError) as bad:
            await client(gateway).audio.transcriptions.create(
                model="whisper-1", file=("talk.wav", conversation.wav), response_format="diarized_json", **extra
            )
        assert bad.value.body["param"] == param, (extra, bad.value.body)  # type: ignore[index]
    with pytest.raises(BadRequestError) as short:  # a reference clip under a second
        await client(gateway).audio.transcriptions.create(
            model="whisper-1", file=("talk.wav", conversation.wav), response_format="diarized_json",
            known_speaker_names=["ann"], known_speaker_references=[data_url("ann", "Hi.")],
        )
    assert short.value.body["param"] == "known_speaker_references"  # type: ignore[index]
