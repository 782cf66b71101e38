"""Contracts and pure helpers: subjects, request translation, error catalogue, stop scanning."""

from __future__ import annotations

import msgspec
import pytest

from contracts import subjects
from contracts.errors import CATALOGUE, InferBusError
from contracts.llm import ChatCompletionRequest, CompletionRequest, chat_to_generate, completion_to_generate
from services.llm.stops import StopScanner
from services.runtime.logging import redact


def test_subject_tokens_are_sanitized() -> None:
    assert subjects.infer("llm", "llama-3.1 8b", "v1.2") == "infer.llm.llama-3_1_8b.v1_2"
    assert subjects.infer("llm", "m", "v", "w1") == "infer.llm.m.v.w1"
    assert subjects.cancel("a.b*c>") == "infer.cancel.a_b_c_"
    with pytest.raises(ValueError):
        subjects.infer("cancel", "m")
    with pytest.raises(ValueError):
        subjects.token("  ")


def test_every_error_code_maps_to_a_status() -> None:
    assert CATALOGUE["no_worker"].http_status == 503 and CATALOGUE["no_worker"].retryable
    assert CATALOGUE["invalid_request"].http_status == 400
    body = InferBusError("model_not_found", "nope", param="model").openai_body()
    assert body == {"error": {"message": "nope", "type": "invalid_request_error", "code": "model_not_found",
                              "param": "model"}}
    with pytest.raises(ValueError):
        InferBusError("made_up", "x")


def _chat(**kw: object) -> ChatCompletionRequest:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return msgspec.json.decode(msgspec.json.encode(base), type=ChatCompletionRequest)


def test_chat_translation() -> None:
    gen = chat_to_generate(_chat(max_completion_tokens=9, stop="END", temperature=0), "r", 512)
    assert (gen.max_tokens, gen.stop, gen.temperature) == (9, ["END"], 0)
    parts = _chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}])
    assert chat_to_generate(parts, "r", 5).messages[0].content == "ab"  # type: ignore[index]


@pytest.mark.parametrize(("kw", "param"), [
    ({"n": 3}, "n"),
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
])
def test_chat_rejections(kw: dict[str, object], param: str) -> None:
    with pytest.raises(InferBusError) as err:
        chat_to_generate(_chat(**kw), "r", 5)
    assert err.value.param == param and err.value.http_status == 400


def test_completion_prompt_forms() -> None:
    ok = msgspec.json.decode(b'{"model": "m", "prompt": ["x"]}', type=CompletionRequest)
    assert completion_to_generate(ok, "r", 5).prompt == "x"
    assert completion_to_generate(ok, "r", 5).max_tokens == 16  # OpenAI's default for completions
    many = msgspec.json.decode(b'{"model": "m", "prompt": ["x", "y"]}', type=CompletionRequest)
    with pytest.raises(InferBusError):
        completion_to_generate(many, "r", 5)


def test_stop_scanner_holds_back_partial_matches() -> None:
    scanner = StopScanner(["END"])
    out = [scanner.feed(t) for t in ["hel", "lo E", "N", "D tail"]]
    assert "".join(out) == "hello " and scanner.stopped
    free = StopScanner([])
    assert free.feed("abc") == "abc"
    partial = StopScanner(["xyz"])
    assert partial.feed("abx") == "a" and partial.flush() == "bx"


def test_keys_are_redacted_from_log_text() -> None:
    line = "auth failed for ib-abcdef123456 with Authorization: Bearer sk-secret"
    assert "abcdef123456" not in redact(line) and "sk-secret" not in redact(line)
