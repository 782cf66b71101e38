"""The gateway's error middleware on its own: a client gone mid-answer is no server error; anything else is."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from structlog.testing import capture_logs

from services.gateway.errors import error_middleware


async def test_a_client_gone_mid_answer_is_not_logged_as_an_error() -> None:
    """wrk closing its connections with requests in flight used to log one `unhandled_error` (with a traceback)
    per request; it is the client's doing, logged at debug level."""

    async def gone(_: web.Request) -> web.StreamResponse:
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    async def broken(_: web.Request) -> web.StreamResponse:
        raise RuntimeError("a bug")

    request = make_mocked_request("POST", "/v1/chat/completions")
    with capture_logs() as events:
        response = await error_middleware(request, gone)
    assert response.status == 499
    assert [(e["event"], e["log_level"]) for e in events] == [("client_gone", "debug")]
    with capture_logs() as events:  # the control: a real failure is still an error, a 500
        response = await error_middleware(request, broken)
    assert response.status == 500
    assert [(e["event"], e["log_level"]) for e in events] == [("unhandled_error", "error")]
