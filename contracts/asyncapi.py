"""An AsyncAPI 3 document of the bus, generated from the contracts: subjects, message schemas, the streaming protocol.

`inferbus contracts --asyncapi` prints it. Payloads are msgpack; their schemas are the msgspec JSON Schemas of
the same Structs (an `array_like` Struct is a msgpack array: `prefixItems` in order, its tag first).
"""

from __future__ import annotations

from typing import Any

import msgspec

from contracts import embed, llm, speech, usage, vision

REF = "#/components/schemas/{name}"
MSGPACK = "application/msgpack"

STREAMING = """\
The caller subscribes to a fresh inbox, then publishes the request with that inbox as its reply subject.
The worker answers on the inbox with typed chunks whose `seq` starts at 0 and grows by one: `Accepted`
first, then the kind's progress chunks (`Delta` tokens, audio, vectors, ...) and `Heartbeat`s while nothing
is ready, and last either the final chunk (finish reason and usage) or an `ErrorChunk` (code from the error
catalogue, message, param). Nothing else ends a stream; a gap in `seq`, no first chunk in time or an idle
stream is a failure. A NATS 503 (no responders) on the inbox means nobody serves the subject. Callers that
send the header `Inferbus-Bundle: 1` may get several chunks in one `Bundle` message. Cancel with an empty
message on `infer.cancel.<request_id>`."""

KINDS: dict[str, tuple[Any, Any, str]] = {  # kind -> (request type, chunk type, what it does)
    "llm": (llm.GenerateRequest, llm.Chunk, "chat and text generation (tools, structured output)"),
    "embed": (embed.EmbedRequest, embed.embed_chunk_decoder.type, "embeddings"),
    "asr": (speech.TranscribeRequest, speech.asr_chunk_decoder.type, "speech to text"),
    "tts": (speech.SpeechRequest, speech.tts_chunk_decoder.type, "text to speech"),
    "vision": (vision.VisionRequest, vision.vision_chunk_decoder.type, "classification, OCR, moderation"),
}


def document() -> dict[str, Any]:
    types: list[Any] = []
    names: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}

    def message(key: str, typ: Any, title: str) -> dict[str, str]:
        types.append(typ)
        names[key] = typ
        messages[key] = {"name": key, "title": title, "contentType": MSGPACK}
        return {"$ref": f"#/components/messages/{key}"}

    for kind, (request, chunk, what) in KINDS.items():
        req = message(f"{kind}Request", request, f"A {kind} request")
        chunks = message(f"{kind}Chunk", chunk, f"One chunk of a {kind} stream")
        parameters = {"model": {"description": "model name (one subject token)"},
                      "version": {"description": "version name (one subject token)"},
                      "worker_id": {"description": "one worker's id"}}
        specs = [
            (f"{kind}Version", f"infer.{kind}.{{model}}.{{version}}", "a version's queue group", ["model", "version"]),
            (f"{kind}Alias", f"infer.{kind}.{{model}}", "the alias: the router applies the traffic policy",
             ["model"]),
            (f"{kind}Worker", f"infer.{kind}.{{model}}.{{version}}.{{worker_id}}", "one worker (least-loaded pick)",
             ["model", "version", "worker_id"]),
        ]
        for key, address, about, params in specs:
            channels[key] = {"address": address, "description": f"{what}: {about}",
                             "parameters": {p: parameters[p] for p in params}, "messages": {"request": req}}
            operations[f"send_{key}"] = {
                "action": "send", "channel": {"$ref": f"#/channels/{key}"},
                "messages": [{"$ref": f"#/channels/{key}/messages/request"}],
                "reply": {"address": {"location": "$message.header#/reply_to",
                                      "description": "the caller's inbox"},
                          "channel": {"$ref": f"#/channels/{kind}Reply"}},
            }
        channels[f"{kind}Reply"] = {"address": None, "description": STREAMING, "messages": {"chunk": chunks}}
    channels["cancel"] = {"address": "infer.cancel.{request_id}", "description": "Cancel a request (empty body)",
                          "parameters": {"request_id": {"description": "the request's id"}},
                          "messages": {"cancel": {"name": "cancel", "payload": {"type": "null"}}}}
    channels["usage"] = {
        "address": "usage.{kind}.{model}",
        "description": "JetStream stream USAGE: one event per request, deduplicated on the request id",
        "parameters": {"kind": {"description": "llm, embed, asr, tts, vision"}, "model": {"description": "model"}},
        "messages": {"event": message("UsageEvent", usage.UsageEvent, "A usage event")},
    }
    operations["cancel"] = {"action": "send", "channel": {"$ref": "#/channels/cancel"}}
    operations["receive_usage"] = {"action": "receive", "channel": {"$ref": "#/channels/usage"}}
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    for (key, _), schema in zip(names.items(), schemas, strict=True):
        messages[key]["payload"] = schema
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "InferBus bus", "version": "0.1.0", "description": STREAMING},
        "defaultContentType": MSGPACK,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": dict(components)},
    }
