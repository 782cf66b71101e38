"""The browser playground (/playground) in a real headless Chromium: streaming chat, and push-to-talk voice
over the Realtime WebSocket with a fake microphone that plays a WAV of a spoken question. The key is typed in
or handed over in the URL fragment, and never appears in a URL the browser requests."""

from __future__ import annotations

import asyncio
import json
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess
from tests.conftest import ADMIN_KEY, DEFAULT_MODEL, Gateway

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
QUESTION = "What is the capital of France?"
LEAD_S, TAIL_S = 0.5, 1.5  # silence around the question in the fake microphone's file

pytestmark = pytest.mark.model


async def wait_ready(nc: bus.Connection, service: str, proc: ServiceProcess, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        proc.check_alive()
        for data in await bus.service_stats(nc, service, wait=0.2):
            if data.get("pid") == proc.pid and data.get("ready"):
                return
    raise TimeoutError(f"{service} not ready:\n{proc.log()[-3000:]}")


@pytest.fixture(scope="module")
async def speech(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[None]:
    procs = [
        ServiceProcess("asr", "services.speech.asr", infra.env(), infra.root),
        ServiceProcess("tts", "services.speech.tts", infra.env(), infra.root),
    ]
    try:
        await wait_ready(nc, "inferbus-asr", procs[0])
        await wait_ready(nc, "inferbus-tts", procs[1])
        yield
    finally:
        for proc in procs:
            proc.stop()


def question_wav(path: Path) -> float:
    """The question spoken by hibari (24 kHz), as 48 kHz 16-bit mono WAV with silence around; its length in s."""
    from hibari import Hibari

    speech = np.asarray(Hibari()(QUESTION), dtype=np.float32)
    rate = 48_000
    upsampled = np.interp(np.arange(len(speech) * 2) / 2, np.arange(len(speech)), speech)
    audio = np.concatenate([np.zeros(int(LEAD_S * rate)), upsampled, np.zeros(int(TAIL_S * rate))])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return len(audio) / rate


@pytest.fixture(scope="module")
def question(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    path = tmp_path_factory.mktemp("playground") / "question.wav"
    return path, question_wav(path)


@pytest.fixture(scope="module")
def browser(question: tuple[Path, float]) -> Iterator[webdriver.Chrome]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={question[0]}%noloop",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    # "performance": the DevTools network events, i.e. every URL the page requested (WebSockets included).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def page_state(driver: webdriver.Chrome) -> dict[str, Any]:
    state: dict[str, Any] = driver.execute_script(
        """const t = (id) => document.getElementById(id).textContent;
        return {status: document.getElementById('status').dataset.state, error: t('error'),
                transcript: t('transcript'), reply: t('reply'), chat: t('chat-output'),
                received: +t('audio-bytes'), played: +t('audio-played'),
                chat_busy: document.getElementById('chat-send').disabled,
                models: [...document.getElementById('model').options].map((o) => o.value),
                model: document.getElementById('model').value, updates: window.chatUpdates || 0};"""
    )
    return state


def wait_for(driver: webdriver.Chrome, what: str, done: Callable[[dict[str, Any]], bool],
             limit_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while True:
        state = page_state(driver)
        if done(state):
            return state
        if time.monotonic() > deadline:
            logs = [entry["message"] for entry in driver.get_log("browser")]  # type: ignore[no-untyped-call]
            raise AssertionError(f"timed out waiting for {what}: {state}\nbrowser console: {logs}")
        time.sleep(0.1)


def requested_urls(driver: webdriver.Chrome) -> list[str]:
    """Every URL the browser requested since the last call (HTTP and WebSocket), from the DevTools log."""
    urls = []
    for entry in driver.get_log("performance"):  # type: ignore[no-untyped-call]
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


def assert_no_key_in_urls(driver: webdriver.Chrome, *keys: str) -> list[str]:
    urls = requested_urls(driver)
    assert any("/playground" in u for u in urls) and any("/v1/models" in u for u in urls), urls
    for url in urls:
        assert "key=" not in url and "#" not in url, url  # fragments are never sent; nor may a key be
        for key in keys:
            assert key not in url, url
    return urls


def page_location(driver: webdriver.Chrome) -> str:
    location: str = driver.execute_script("return location.href;")
    return location


def open_page(driver: webdriver.Chrome, gateway: Gateway, fragment: str) -> None:
    driver.get("about:blank")  # a fresh document even when only the fragment differs
    driver.get(f"{gateway.url}/playground#{fragment}")
    wait_for(driver, "the model list", lambda s: DEFAULT_MODEL in s["models"] or bool(s["error"]), 20)
    assert "key" not in page_location(driver)  # taken out of the address bar and history at once
    driver.execute_script(f"document.getElementById('model').value = {DEFAULT_MODEL!r};")


def chat_turn(driver: webdriver.Chrome, gateway: Gateway) -> dict[str, Any]:
    open_page(driver, gateway, f"key={ADMIN_KEY}&temperature=0")
    # Count how often the answer's text changes: a streamed answer arrives in several pieces.
    driver.execute_script(
        """window.chatUpdates = 0;
        new MutationObserver(() => window.chatUpdates++).observe(document.getElementById('chat-output'),
            {childList: true, subtree: true, characterData: true});"""
    )
    driver.find_element(By.ID, "chat-input").send_keys("Name three colours.")
    driver.find_element(By.ID, "chat-send").click()
    return wait_for(driver, "a streamed answer", lambda s: bool(s["error"]) or (
        not s["chat_busy"] and s["chat"].startswith("You: Name three colours.") and len(s["chat"]) > 30))


def voice_turn(driver: webdriver.Chrome, gateway: Gateway, hold_s: float) -> dict[str, Any]:
    open_page(driver, gateway, f"key={ADMIN_KEY}&temperature=0")
    assert driver.execute_script("return document.getElementById('temperature').value;") == "0"
    talk = driver.find_element(By.ID, "talk")
    ActionChains(driver).click_and_hold(talk).perform()
    try:
        wait_for(driver, "recording", lambda s: s["status"] == "recording" or bool(s["error"]), 20)
        time.sleep(hold_s)  # the fake microphone plays the question for as long as it lasts
    finally:
        ActionChains(driver).release(talk).perform()
    return wait_for(driver, "the spoken answer", lambda s: bool(s["error"]) or (
        s["status"] == "ready" and bool(s["reply"].strip()) and s["played"] > 0), 120)


async def test_playground_page_is_served(gateway: Gateway) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/playground") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    for element in ('id="key"', 'id="talk"', 'id="chat-send"', 'id="audio-bytes"'):
        assert element in page
    assert "http://" not in page and "https://" not in page  # nothing is loaded from elsewhere


async def test_bad_key_shows_the_http_error(gateway: Gateway, browser: webdriver.Chrome) -> None:
    def run() -> dict[str, Any]:
        browser.get(f"{gateway.url}/playground#key=not-a-key")
        return wait_for(browser, "an error", lambda s: bool(s["error"]), 20)

    state = await asyncio.to_thread(run)
    assert "HTTP 401" in state["error"], state
    assert_no_key_in_urls(browser, "not-a-key")


def ask_for_the_key(driver: webdriver.Chrome, gateway: Gateway) -> tuple[dict[str, Any], dict[str, Any], str]:
    driver.get(f"{gateway.url}/playground")
    driver.execute_script("sessionStorage.clear();")
    driver.refresh()
    asked = page_state(driver)
    field = driver.find_element(By.ID, "key")
    field.send_keys(ADMIN_KEY)
    field.send_keys(Keys.TAB)  # "change": the page stores the key and lists the models
    typed = wait_for(driver, "the model list", lambda s: DEFAULT_MODEL in s["models"] or bool(s["error"]), 20)
    driver.refresh()  # the tab keeps the key (sessionStorage), and only the tab
    wait_for(driver, "the model list again", lambda s: DEFAULT_MODEL in s["models"] or bool(s["error"]), 20)
    kept: str = driver.execute_script("return document.getElementById('key').value;")
    return asked, typed, kept


async def test_page_asks_for_the_key_and_keeps_it_out_of_urls(gateway: Gateway, browser: webdriver.Chrome) -> None:
    asked, typed, kept = await asyncio.to_thread(ask_for_the_key, browser, gateway)
    assert asked["models"] == [""] and not asked["error"], asked  # "(enter a key)": nothing requested yet
    assert not typed["error"], typed
    assert kept == ADMIN_KEY
    assert_no_key_in_urls(browser, ADMIN_KEY)


async def test_chat_streams_an_answer(
    gateway: Gateway, default_worker: dict[str, Any], browser: webdriver.Chrome
) -> None:
    state = await asyncio.to_thread(chat_turn, browser, gateway)
    assert not state["error"], state
    assert state["updates"] > 3, state  # the answer grew piece by piece
    urls = assert_no_key_in_urls(browser, ADMIN_KEY)
    assert any(u.endswith("/v1/chat/completions") for u in urls), urls


async def test_push_to_talk_voice_turn(
    gateway: Gateway, default_worker: dict[str, Any], speech: None, browser: webdriver.Chrome,
    question: tuple[Path, float],
) -> None:
    started = time.monotonic()
    try:
        state = await asyncio.to_thread(voice_turn, browser, gateway, question[1] - TAIL_S + 0.5)
    except WebDriverException as exc:
        pytest.fail(f"the browser failed: {exc}")
    assert not state["error"], state
    transcript = state["transcript"].lower()
    assert "capital" in transcript and "france" in transcript, state
    assert "Paris" in state["reply"], state  # temperature 0: SmolLM2's greedy answer
    assert state["received"] > 24_000 and state["played"] == state["received"], state
    assert time.monotonic() - started < 90, "the voice turn took too long"
    urls = assert_no_key_in_urls(browser, ADMIN_KEY)
    assert any(u.startswith("ws://") and "/v1/realtime" in u for u in urls), urls
