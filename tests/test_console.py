"""The ops console (/console) in a real headless Chromium against a running platform (registry, metering, gateway,
benchmark workers): every view shows the platform's own data, a promote and a revoke done in the page take effect,
the admin key never appears in a URL, and a screenshot of each view is saved for review."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess
from tests.conftest import ADMIN_KEY, GHOST_MODEL, Gateway, Workers, running_service, start_worker
from tests.test_playground import CHROMEDRIVER, CHROMIUM, requested_urls
from tests.test_registry import admin, serve, until_gateway

MODEL = "console-chat"
SHOTS = Path(__file__).parent.parent / ".inferbus" / "screenshots" / "console"
SVG_NS = "http://www.w3.org/2000/svg"


@dataclass
class Console:
    """The browser, the gateway it talks to, and every URL it requested so far."""

    driver: webdriver.Chrome
    gateway: Gateway
    shots: Path
    urls: list[str] = field(default_factory=list)

    def requested(self) -> list[str]:
        """The URLs requested since the last call (all of them are kept in `urls`)."""
        fresh = requested_urls(self.driver)
        self.urls += fresh
        return fresh


@dataclass
class Platform:
    gateway: Gateway
    workers: Workers
    worker_ids: dict[str, str]


@pytest.fixture(scope="module")
async def metering(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[ServiceProcess]:
    async with running_service(infra, nc, "metering") as proc:
        yield proc


@pytest.fixture(scope="module")
async def platform(
    infra: EmbeddedStack, nc: bus.Connection, registry: ServiceProcess, metering: ServiceProcess, gateway: Gateway
) -> AsyncIterator[Platform]:
    """MODEL's v1 on a benchmark worker with 4 slots, paced so that a few long requests show as load."""
    started: Workers = {}
    try:
        ids = await serve(infra, nc, started, MODEL, v1={"engine_options": {"tokens_per_s": 40, "capacity": 4}})
        view = await admin(nc, "deploy", model=MODEL, version="v1")
        async with aiohttp.ClientSession() as http:
            await until_gateway(http, gateway, MODEL, view["revision"], workers=1)
        yield Platform(gateway, started, ids)
    finally:
        for proc in started.values():
            proc.stop()


@pytest.fixture(scope="module")
def console(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: make browser")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    # "performance": the DevTools network events, i.e. every URL the page requested.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield Console(driver, gateway, tmp_path_factory.mktemp("console-screenshots"))
    finally:
        driver.quit()


# ---- page helpers (blocking: run in a thread) ------------------------------------------------------


def wait(c: Console, what: str, done: Callable[[webdriver.Chrome], Any], limit_s: float = 30) -> Any:
    """WebDriverWait for `done` (re-rendered elements are retried), with the page's error on a timeout."""
    try:
        return WebDriverWait(c.driver, limit_s, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(done)
    except TimeoutException:
        error = c.driver.find_element(By.ID, "error").text
        logs = [e["message"] for e in c.driver.get_log("browser")]  # type: ignore[no-untyped-call]
        raise AssertionError(f"timed out waiting for {what}; page error: {error!r}; console: {logs}") from None


def js(c: Console, script: str, *args: Any) -> Any:
    return c.driver.execute_script(script, *args)


def log_in(c: Console, key: str) -> None:
    """A fresh page with nothing stored; the key typed into the field (never into a URL)."""
    c.driver.get(f"{c.gateway.url}/console")
    js(c, "sessionStorage.clear();")
    c.driver.get("about:blank")
    c.driver.get(f"{c.gateway.url}/console")
    assert js(c, "return document.getElementById('key').value;") == ""
    field = c.driver.find_element(By.ID, "key")
    field.send_keys(key)
    field.send_keys(Keys.TAB)  # "change": the page keeps the key in sessionStorage and loads the view


def open_view(c: Console, view: str) -> None:
    loaded = int(js(c, f"return +document.getElementById('view-{view}').dataset.loaded;"))
    c.driver.find_element(By.CSS_SELECTOR, f"#tabs button[data-view={view}]").click()
    wait(c, f"the {view} view", lambda d: int(d.execute_script(
        f"return +document.getElementById('view-{view}').dataset.loaded;")) > loaded)


def click(c: Console, css: str) -> None:
    """Click what `css` finds, again if the auto-refresh replaced it between finding and clicking."""
    def clicked(d: webdriver.Chrome) -> bool:
        d.find_element(By.CSS_SELECTOR, css).click()
        return True

    wait(c, f"a click on {css}", clicked, 10)


def confirm(c: Console, expect: str) -> None:
    """Accept the page's confirmation dialog, after checking what it asks."""
    wait(c, "the confirmation dialog", lambda d: d.execute_script("return document.getElementById('confirm').open;"))
    text = c.driver.find_element(By.ID, "confirm-text").text
    assert expect in text, text
    c.driver.find_element(By.ID, "confirm-ok").click()


def screenshot(c: Console, name: str) -> Path:
    """The whole page (beyond the window) as PNG under the test's tmp dir, copied to .inferbus/screenshots/console/."""
    size = c.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000), "scale": 1}
    shot = c.driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                               "clip": clip})
    path = c.shots / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path
    SHOTS.mkdir(parents=True, exist_ok=True)
    kept = shutil.copy(path, SHOTS / path.name)
    print(f"\nscreenshot {name}: {path} (copy: {kept})")
    return path


def assert_no_key_in_urls(c: Console, *keys: str) -> list[str]:
    urls = c.requested()
    assert any("/console" in u for u in urls), urls  # the log is read: an empty one would pass vacuously
    for url in urls:
        assert "key=" not in url and "#" not in url, url
        for key in keys:
            assert key not in url, url
    return urls


def http_status(url: str, key: str, body: dict[str, Any] | None = None) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def chat_body(model: str = MODEL, max_tokens: int = 2) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens}


def row_texts(c: Console, css: str) -> list[str]:
    return [row.text for row in c.driver.find_elements(By.CSS_SELECTOR, css)]


# ---- HTTP: the page and the admin JSON it reads --------------------------------------------------------


async def test_the_page_is_served_without_a_key_and_loads_nothing_from_elsewhere(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/console") as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert response.headers["Cache-Control"] == "no-cache"
        page = await response.text()
    for element in ('id="key"', 'data-view="services"', 'data-view="models"', 'data-view="usage"',
                    'data-view="requests"', 'data-view="keys"', 'id="confirm"'):
        assert element in page, element
    assert set(re.findall(r"https?://[^\s\"'<>`]+", page)) == {SVG_NS}  # only the SVG namespace, never a fetch


async def new_key(http: aiohttp.ClientSession, gateway: Gateway, name: str, **fields: Any) -> tuple[str, str]:
    async with http.post(gateway.url + "/v1/admin/keys", headers=gateway.headers,
                         json={"name": name, **fields}) as resp:
        assert resp.status == 201, await resp.text()
        created = await resp.json()
        return created["key"], created["info"]["id"]


async def test_admin_json_needs_an_admin_key_and_matches_the_document(platform: Platform) -> None:
    gw = platform.gateway
    async with aiohttp.ClientSession() as http:
        user_key, _ = await new_key(http, gw, "console-user-" + secrets.token_hex(3))
        for path in ("/v1/admin/services", "/v1/admin/models", f"/v1/admin/models/{MODEL}"):
            async with http.get(gw.url + path) as resp:
                assert resp.status == 401, path
            async with http.get(gw.url + path, headers={"Authorization": f"Bearer {user_key}"}) as resp:
                assert resp.status == 403 and (await resp.json())["error"]["code"] == "permission_denied", path
        for action in ("promote", "rollback"):
            async with http.post(f"{gw.url}/v1/admin/models/{MODEL}/{action}",
                                 headers={"Authorization": f"Bearer {user_key}"}) as resp:
                assert resp.status == 403, action
        async with http.get(gw.url + "/openapi.json") as resp:
            spec = await resp.json()
        async with http.get(gw.url + "/v1/admin/services", headers=gw.headers) as resp:
            assert resp.status == 200
            fleet = await resp.json()
        async with http.get(gw.url + "/v1/admin/models", headers=gw.headers) as resp:
            assert resp.status == 200
            models = await resp.json()
        async with http.get(gw.url + "/v1/admin/models/never-registered", headers=gw.headers) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
        async with http.post(f"{gw.url}/v1/admin/models/{MODEL}/promote", headers=gw.headers) as resp:
            error = (await resp.json())["error"]  # a registry error keeps its code and message
            assert resp.status == 409 and error["code"] == "conflict" and "no canary" in error["message"], error
    for name, body in (("Fleet", fleet), ("RegisteredModels", models)):
        root = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
        jsonschema.Draft202012Validator(root).validate(body)
    assert spec["paths"]["/v1/admin/models/{model}/promote"]["post"]["responses"]["200"]
    worker = next(w for w in fleet["workers"] if w["worker_id"] == platform.worker_ids["v1"])
    assert (worker["model"], worker["version"], worker["capacity"], worker["ready"]) == (MODEL, "v1", 4, True)
    assert {"inferbus-gateway", "inferbus-registry", "inferbus-metering", "inferbus-llm"} <= {
        s["name"] for s in fleet["services"]}
    model = next(m for m in models["data"] if m["name"] == MODEL)
    assert model["policy"]["stable"] == "v1" and [v["version"] for v in model["versions"]] == ["v1"]


# ---- the page ----------------------------------------------------------------------------------------------


async def test_a_wrong_key_and_a_non_admin_key_get_a_clear_message(platform: Platform, console: Console) -> None:
    async with aiohttp.ClientSession() as http:
        user_key, _ = await new_key(http, platform.gateway, "console-nonadmin-" + secrets.token_hex(3))

    def run() -> tuple[str, str]:
        log_in(console, "ib-not-a-key-" + "z" * 20)
        wrong = wait(console, "the refusal", lambda d: d.find_element(By.ID, "error").text)
        screenshot(console, "0-wrong-key")
        log_in(console, user_key)
        nonadmin = wait(console, "the refusal", lambda d: d.find_element(By.ID, "error").text)
        return wrong, nonadmin

    wrong, nonadmin = await asyncio.to_thread(run)
    assert "key was refused" in wrong and "HTTP 401" in wrong, wrong
    assert "not an admin key" in nonadmin and "HTTP 403" in nonadmin, nonadmin
    assert_no_key_in_urls(console, user_key, "ib-not-a-key")


async def test_services_view_shows_live_services_and_the_worker_with_its_load(
    platform: Platform, console: Console
) -> None:
    worker_id = platform.worker_ids["v1"]
    row = f"#workers-table tr[data-worker='{worker_id}']"

    def run() -> tuple[dict[str, Any], list[str]]:
        log_in(console, ADMIN_KEY)
        open_view(console, "services")
        # Two 12 s generations hold 2 of the worker's 4 slots while the page refreshes.
        busy = wait(console, "the worker busy", lambda d: d.execute_script(
            "const r = document.querySelector(arguments[0]);"
            "return r && +r.dataset.load >= 0.5 ? {load: +r.dataset.load, text: r.innerText} : null;", row))
        screenshot(console, "1-services")
        return busy, row_texts(console, "#services-table tbody tr")

    async with aiohttp.ClientSession() as http:
        async def long_request() -> int:
            async with http.post(platform.gateway.url + "/v1/chat/completions", headers=platform.gateway.headers,
                                 json=chat_body(max_tokens=480)) as resp:
                await resp.read()
                return resp.status

        load = [asyncio.create_task(long_request()) for _ in range(2)]
        busy, services = await asyncio.to_thread(run)
        assert await asyncio.gather(*load) == [200, 200]
    assert MODEL in busy["text"] and "v1" in busy["text"] and "benchmark" in busy["text"], busy
    assert "ready" in busy["text"] and "50%" in busy["text"], busy  # 2 in flight of 4 slots
    for name in ("inferbus-gateway", "inferbus-registry", "inferbus-metering", "inferbus-llm"):
        assert any(text.startswith(name) for text in services), (name, services)
    assert_no_key_in_urls(console, ADMIN_KEY)


async def test_usage_and_requests_views_show_this_tests_traffic(platform: Platform, console: Console) -> None:
    gw = platform.gateway
    async with aiohttp.ClientSession() as http:
        request_ids = []
        for _ in range(3):
            async with http.post(gw.url + "/v1/chat/completions", headers=gw.headers, json=chat_body()) as resp:
                assert resp.status == 200
                request_ids.append(resp.headers["x-request-id"])
        async with http.post(gw.url + "/v1/chat/completions", headers=gw.headers,
                             json=chat_body(GHOST_MODEL)) as resp:
            assert resp.status == 503  # configured, never served: an error in the request log
        async with http.get(gw.url + "/v1/admin/keys", headers=gw.headers) as resp:
            admin_id = next(k["id"] for k in (await resp.json())["data"]
                            if ADMIN_KEY.startswith(k["prefix"]) and not k["revoked_at"])

    def legend(css: str, series: str) -> Callable[[webdriver.Chrome], Any]:
        return lambda d: d.execute_script(
            "const s = document.querySelector(arguments[0] + ` .legend [data-series='${arguments[1]}']`);"
            "return s && +s.dataset.requests >= 3 ? {requests: +s.dataset.requests, text: s.textContent,"
            " bars: document.querySelectorAll(arguments[0] + ' svg rect[data-series]').length} : null;", css, series)

    def run() -> dict[str, Any]:
        log_in(console, ADMIN_KEY)
        open_view(console, "usage")
        by_model = wait(console, "usage by model", legend("#usage-by-model", MODEL), 60)
        by_key = wait(console, "usage by key", legend("#usage-by-key", admin_id), 60)
        screenshot(console, "2-usage")
        open_view(console, "requests")
        wait(console, "the test's requests", lambda d: all(
            d.find_elements(By.CSS_SELECTOR, f"#requests-table tr[data-request-id='{rid}']")
            for rid in request_ids), 60)
        errors = wait(console, "the ghost error", lambda d: [
            t for t in row_texts(console, "#errors-table tbody tr[data-status=error]") if GHOST_MODEL in t], 60)
        screenshot(console, "3-requests")
        served = [console.driver.find_element(By.CSS_SELECTOR, f"#requests-table tr[data-request-id='{rid}']").text
                  for rid in request_ids]
        return {"by_model": by_model, "by_key": by_key, "errors": errors, "served": served}

    seen = await asyncio.to_thread(run)
    async with aiohttp.ClientSession(headers=gw.headers) as http:
        async def rows(bucket: str) -> list[dict[str, Any]]:
            params = {"since": "2h", "group_by": f"{bucket},model", "model": MODEL}
            async with http.get(gw.url + "/v1/usage", params=params) as resp:
                assert resp.status == 200, await resp.text()
                found: list[dict[str, Any]] = (await resp.json())["rows"]
                return found

        # The same usage read from minute and from hour rollups; a minute report unchanged around the hour
        # report means no event landed in between (a late one may land any time: usage only grows).
        for _ in range(20):
            minutes, hours, again = await rows("minute"), await rows("hour"), await rows("minute")
            if minutes == again:
                break
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00Z", r["minute"]) for r in minutes), minutes
    assert sum(r["requests"] for r in minutes) == sum(r["requests"] for r in hours) >= 3, (minutes, hours)
    assert seen["by_model"]["bars"] >= 1 and seen["by_model"]["text"].startswith(f"{MODEL}:"), seen
    assert "admin (bootstrap)" in seen["by_key"]["text"], seen
    assert all(MODEL in text and "v1" in text and re.search(r"\bok\b", text) for text in seen["served"]), seen
    assert any("no_worker" in text and "503" in text for text in seen["errors"]), seen
    assert_no_key_in_urls(console, ADMIN_KEY)


async def test_a_canary_promoted_in_the_page_becomes_stable(
    infra: EmbeddedStack, nc: bus.Connection, platform: Platform, console: Console
) -> None:
    await admin(nc, "register", model=MODEL, version="v2", engine="benchmark")
    proc = platform.workers[f"{MODEL}-v2"] = start_worker(infra, MODEL, version="v2")
    view = await admin(nc, "canary", model=MODEL, version="v2", weight=25)
    card = f".model[data-model='{MODEL}']"

    def run() -> None:
        log_in(console, ADMIN_KEY)
        open_view(console, "models")
        wait(console, "the canary at 25%", lambda d: d.execute_script(
            "const c = document.querySelector(arguments[0]);"
            "return c && c.dataset.canary === 'v2' && c.dataset.canaryWeight === '25'"
            " && c.querySelector('tr[data-version=v2][data-status=canary]')"
            " && c.querySelector('tr[data-version=v1][data-status=stable]');", card))
        screenshot(console, "4-models-canary")
        click(console, f"{card} button.promote")
        confirm(console, "Promote v2")
        wait(console, "v2 stable in the page", lambda d: d.execute_script(
            "const c = document.querySelector(arguments[0]);"
            "return c && c.dataset.stable === 'v2' && c.dataset.canary === '';", card))
        screenshot(console, "5-models-promoted")

    await asyncio.to_thread(run)
    shown = await admin(nc, "show", model=MODEL)
    assert shown["policy"]["stable"] == "v2" and shown["policy"].get("canary") is None, shown["policy"]
    assert shown["revision"] > view["revision"]
    history = await admin(nc, "history", model=MODEL, limit=1)
    async with aiohttp.ClientSession() as http:
        async with http.get(platform.gateway.url + "/v1/admin/keys", headers=platform.gateway.headers) as resp:
            admin_id = next(k["id"] for k in (await resp.json())["data"]
                            if ADMIN_KEY.startswith(k["prefix"]) and not k["revoked_at"])
    assert (history[0]["action"], history[0]["actor"]) == ("promote", f"key:{admin_id}"), history
    assert proc.popen.poll() is None
    assert any(u.endswith(f"/v1/admin/models/{MODEL}/promote") for u in assert_no_key_in_urls(console, ADMIN_KEY))


async def test_a_key_created_then_revoked_in_the_page_is_refused(platform: Platform, console: Console) -> None:
    name = "console-made-" + secrets.token_hex(3)
    chat_url = platform.gateway.url + "/v1/chat/completions"
    row = f"#keys-table tr[data-name='{name}']"

    def run() -> tuple[str, int, str, bool]:
        log_in(console, ADMIN_KEY)
        open_view(console, "keys")
        for field_id, value in (("new-key-name", name), ("new-key-rpm", "60"), ("new-key-tpm", "50000"),
                                ("new-key-concurrency", "4")):
            console.driver.find_element(By.ID, field_id).send_keys(value)
        console.driver.find_element(By.ID, "new-key-create").click()
        key = wait(console, "the new key shown once", lambda d: d.execute_script(
            "const box = document.getElementById('new-key-secret');"
            "return box.hidden ? null : document.getElementById('new-key-value').textContent;"))
        wait(console, "the new key listed", lambda d: d.find_elements(By.CSS_SELECTOR, f"{row} button.revoke"))
        listed = console.driver.find_element(By.CSS_SELECTOR, row).text
        before = http_status(chat_url, key, chat_body())
        screenshot(console, "6-keys-created")
        click(console, f"{row} button.revoke")
        confirm(console, f"Revoke the key {name}")
        wait(console, "the key shown revoked", lambda d: "revoked" in (
            d.find_element(By.CSS_SELECTOR, row).get_attribute("class") or "").split())
        hidden = js(console, "return document.getElementById('new-key-secret').hidden;")
        screenshot(console, "7-keys-revoked")
        return key, before, listed, hidden

    key, before, listed, hidden = await asyncio.to_thread(run)
    assert key.startswith("ib-") and before == 200, (key[:6], before)
    assert hidden  # the one-time display of a key goes away once the key is revoked
    assert "60 req/min, 50000 tokens/min, 4 at once" in listed, listed
    async with aiohttp.ClientSession() as http:
        async with http.get(platform.gateway.url + "/v1/admin/keys?include_revoked=true",
                            headers=platform.gateway.headers) as resp:
            info = next(k for k in (await resp.json())["data"] if k["name"] == name)
    assert info["limits"] == {"rpm": 60, "tpm": 50000, "concurrency": 4} and info["revoked_at"], info
    assert http_status(chat_url, key, chat_body()) == 401
    assert_no_key_in_urls(console, ADMIN_KEY, key)


async def test_the_admin_key_never_appears_in_any_url_the_page_requested(console: Console) -> None:
    console.requested()
    paths = {re.sub(r"\?.*", "", u.split("//", 1)[-1].split("/", 1)[-1]) for u in console.urls}
    for must in ("console", "v1/admin/services", "v1/admin/models", "v1/usage", "v1/admin/requests",
                 "v1/admin/keys", f"v1/admin/models/{MODEL}/promote"):
        assert must in paths, (must, sorted(paths))
    assert any(p.startswith("v1/admin/keys/") and p.endswith("/revoke") for p in paths), sorted(paths)
    for url in console.urls:
        assert ADMIN_KEY not in url and "key=" not in url, url


async def test_registry_down_is_a_503_the_page_explains(
    platform: Platform, registry: ServiceProcess, console: Console
) -> None:
    registry.stop()  # the module's own registry: this is the module's last test
    async with aiohttp.ClientSession() as http:
        async with http.get(platform.gateway.url + "/v1/admin/models", headers=platform.gateway.headers) as resp:
            body = await resp.json()
            assert resp.status == 503 and body["error"]["code"] == "no_worker", body
    assert "registry is not answering" in body["error"]["message"], body

    def run() -> str:
        log_in(console, ADMIN_KEY)
        console.driver.find_element(By.CSS_SELECTOR, "#tabs button[data-view=models]").click()
        text: str = wait(console, "the registry error", lambda d: d.find_element(By.ID, "error").text)
        screenshot(console, "8-registry-down")
        return text

    assert "registry is not answering" in await asyncio.to_thread(run)
