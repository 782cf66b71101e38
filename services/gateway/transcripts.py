"""A finished transcription in OpenAI's response formats: json, text, srt, vtt, verbose_json, diarized_json."""

from __future__ import annotations

import zlib
from typing import Any, Final

from contracts.speech import Segment, Transcript

FORMATS: Final = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
GRANULARITIES: Final = ("segment", "word")

# Whisper's language codes and the names OpenAI's verbose_json reports.
LANGUAGES: Final = dict(
    pair.split(":")
    for pair in (
        "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese pt:portuguese "
        "tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian id:indonesian hi:hindi "
        "fi:finnish vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay cs:czech ro:romanian da:danish "
        "hu:hungarian ta:tamil no:norwegian th:thai ur:urdu hr:croatian bg:bulgarian lt:lithuanian la:latin "
        "mi:maori ml:malayalam cy:welsh sk:slovak te:telugu fa:persian lv:latvian bn:bengali sr:serbian "
        "az:azerbaijani sl:slovenian kn:kannada et:estonian mk:macedonian br:breton eu:basque is:icelandic "
        "hy:armenian ne:nepali mn:mongolian bs:bosnian kk:kazakh sq:albanian sw:swahili gl:galician "
        "mr:marathi pa:punjabi si:sinhala km:khmer sn:shona yo:yoruba so:somali af:afrikaans oc:occitan "
        "ka:georgian be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic yi:yiddish lo:lao uz:uzbek "
        "fo:faroese ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese sa:sanskrit "
        "lb:luxembourgish my:myanmar bo:tibetan tl:tagalog mg:malagasy as:assamese tt:tatar haw:hawaiian "
        "ln:lingala ha:hausa ba:bashkir jw:javanese su:sundanese yue:cantonese"
    ).split()
)


def language_name(code: str) -> str:
    return LANGUAGES.get(code, code).replace("_", " ")


def usage(transcript: Transcript) -> dict[str, Any]:
    return {"type": "duration", "seconds": transcript.duration}


def as_json(transcript: Transcript) -> dict[str, Any]:
    return {"text": transcript.text, "usage": usage(transcript)}


def as_text(transcript: Transcript) -> str:
    return transcript.text + "\n"


def _timestamp(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def as_srt(segments: list[Segment]) -> str:
    blocks = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(blocks)


def as_vtt(segments: list[Segment]) -> str:
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def _compression_ratio(text: str) -> float:
    raw = text.encode()
    return round(len(raw) / len(zlib.compress(raw)), 3) if raw else 0.0


def as_verbose_json(
    transcript: Transcript, segments: list[Segment], task: str, temperature: float, granularities: list[str]
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": task,
        "language": language_name(transcript.language),
        "duration": transcript.duration,
        "text": transcript.text,
    }
    if "word" in granularities:
        body["words"] = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for s in segments
            for w in s.words
        ]
    if "segment" in granularities or not granularities:
        body["segments"] = [
            {
                "id": s.id,
                "seek": int(s.start * 100),
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": [],
                "temperature": temperature,
                "avg_logprob": round(s.avg_logprob, 4),
                "compression_ratio": _compression_ratio(s.text),
                "no_speech_prob": round(s.no_speech_prob, 4),
                **({"speaker": s.speaker} if s.speaker is not None else {}),
            }
            for s in segments
        ]
    body["usage"] = usage(transcript)
    return body


def as_diarized_json(transcript: Transcript, segments: list[Segment]) -> dict[str, Any]:
    """OpenAI's diarized_json: one segment per run of one speaker's words."""
    return {
        "task": "transcribe",
        "duration": transcript.duration,
        "text": transcript.text,
        "segments": [
            {"type": "transcript.text.segment", "id": f"seg_{s.id}", "start": s.start, "end": s.end,
             "text": s.text.strip(), "speaker": s.speaker or "A"}
            for s in segments
        ],
        "usage": usage(transcript),
    }
