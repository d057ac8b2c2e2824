"""The web console in a real headless browser (issue 15): Debian's Chromium driven by Playwright, against a real
`ladle serve` of the demo repository. The models view lists every demo model with its state; the chat playground
streams a reply from the demo LLM into the page (the same greedy answer the API gives); the iris form returns the
label the API returns; the live view draws its charts; with keys, the page asks for them (kept in memory only) and
unloading and reloading iris from the console works. Screenshots of each view land in test-artifacts/console/.

Chromium comes from Debian (`make install` installs it as root: scripts/install-chromium.sh); LADLE_CHROMIUM may name
another binary. Without one these tests skip, saying so."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server import LadleServer

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra (make install)")

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
API_KEY = "console-api-key-0123456789"
ADMIN_KEY = "console-admin-key-0123456789"
DEMO_MODELS = ("iris", "minilm", "smollm2", "textstats")


def chromium() -> str | None:
    return os.environ.get("LADLE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[playwright.Browser]:
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium: `make install` installs Debian's chromium as root (or set LADLE_CHROMIUM)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start
        launched = p.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser) -> Iterator[playwright.Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"the page raised: {errors}"


def shot(page: playwright.Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def model_state(page: playwright.Page, name: str) -> playwright.Locator:
    return page.locator(f"[data-testid=model][data-model={name}] .model-state [data-testid=state]")


# -- the shared demo server: no keys, admin API off ---------------------------------------------------------------
def test_models_view_lists_every_demo_model_with_its_state(page, demo_server) -> None:
    page.goto(demo_server.url + "/")
    for name in DEMO_MODELS:
        playwright.expect(model_state(page, name)).to_have_text("READY", timeout=15_000)
    iris = page.locator("[data-testid=model][data-model=iris]")
    playwright.expect(iris.locator("[data-testid=version]")).to_have_count(2)
    playwright.expect(iris).to_contain_text("input FP32 [-1, 4]")
    playwright.expect(page.locator("[data-model=smollm2]")).to_contain_text("LLM")
    # no --admin-key and no --allow-admin-without-key: the buttons are off and the page says how to turn them on
    playwright.expect(page.get_by_test_id("admin-off")).to_contain_text("--admin-key")
    playwright.expect(iris.get_by_test_id("unload")).to_be_disabled()
    playwright.expect(page.locator("#ready")).to_have_text("ready")
    assert page.locator("#key-dialog").is_visible() is False  # no key needed, none asked for
    shot(page, "models")


def test_the_chat_playground_streams_the_demo_llm_into_the_page(page, demo_server) -> None:
    question = "What is the capital of France?"
    page.goto(demo_server.url + "/#playground/smollm2")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "24")
    page.fill("#chat-input", question)
    page.click("#chat-send")
    reply = page.locator("[data-testid=assistant]")
    # part of the reply is on the page before the stream has ended: it streams
    page.wait_for_function("() => { const r = document.querySelector('[data-testid=assistant]');"
                           " return r && Number(r.dataset.chunks) >= 1 && r.dataset.done !== 'true'; }",
                           timeout=30_000, polling=10)
    playwright.expect(reply).to_have_attribute("data-done", "true", timeout=60_000)
    text = reply.locator(".content").inner_text()
    assert int(reply.get_attribute("data-chunks")) > 1
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="none")
    expected = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                              temperature=0, top_p=1, max_tokens=24).choices[0].message.content
    assert text.strip() == expected.strip() and "Paris" in text
    playwright.expect(page.get_by_test_id("chat-stats")).to_contain_text("first token")
    snippet = page.get_by_test_id("snippet-openai-python")
    playwright.expect(snippet).to_contain_text(question)
    playwright.expect(snippet).to_contain_text('model="smollm2"')
    playwright.expect(page.get_by_test_id("snippet-curl")).to_contain_text("/v1/chat/completions")
    shot(page, "chat")


def test_the_chat_playground_asks_for_structured_output(page, demo_server) -> None:
    page.goto(demo_server.url + "/#playground/smollm2")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "48")
    page.select_option("#chat-format", "json_schema")  # the default schema: {city, country}, nothing else
    page.fill("#chat-input", "Where is the Eiffel Tower?")
    page.click("#chat-send")
    reply = page.locator("[data-testid=assistant]")
    playwright.expect(reply).to_have_attribute("data-done", "true", timeout=60_000)
    answer = json.loads(reply.locator(".content").inner_text())
    assert answer == {"city": "Paris", "country": "France"}
    playwright.expect(page.get_by_test_id("snippet-curl")).to_contain_text('"type": "json_schema"')


def test_the_iris_form_returns_the_label_the_api_returns(page, demo_server) -> None:
    features = [6.7, 3.0, 5.2, 2.3]
    page.goto(demo_server.url + "/#playground/iris")
    for i, value in enumerate(features):
        page.fill(f"input[data-input=input][data-index='{i}']", str(value))
    page.click("#infer-run")
    label = page.locator("[data-testid=output][data-name=label] [data-testid=output-data]")
    playwright.expect(label).to_be_visible(timeout=15_000)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": features}]}
    answer = httpx.post(demo_server.url + "/v2/models/iris/infer", json=body).json()
    expected = next(o for o in answer["outputs"] if o["name"] == "label")["data"]
    assert label.inner_text() == ", ".join(str(v) for v in expected)
    playwright.expect(page.get_by_test_id("snippet-tritonclient")).to_contain_text("InferInput(\"input\", [1, 4]")
    shot(page, "infer")
    # a BYTES model gets text fields
    page.goto(demo_server.url + "/#playground/textstats")
    page.fill("input[data-input=text][data-index='0']", "ladle")
    page.click("#infer-run")
    playwright.expect(page.locator("[data-testid=output][data-name=upper]")).to_contain_text('"LADLE"')


def test_the_live_view_draws_charts_from_the_servers_figures(page, demo_server) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
    page.goto(demo_server.url + "/#live")
    for _ in range(20):
        assert httpx.post(demo_server.url + "/v2/models/iris/infer", json=body).status_code == 200
    iris = page.locator("[data-testid=live-model][data-model=iris]")
    playwright.expect(iris.locator("[data-testid=chart]")).to_have_count(4, timeout=15_000)
    playwright.expect(iris.locator("[data-title=Requests] polyline, [data-title=Requests] circle").first) \
        .to_be_attached(timeout=15_000)
    shot(page, "live")


# -- a server with keys: the page asks for them --------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(demo_repository) -> Iterator[LadleServer]:
    args = [demo_repository, "--load-model", "iris", "--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    with LadleServer(args) as server:
        yield server


def answer_key(page: playwright.Page, title: str, key: str) -> None:
    dialog = page.locator("#key-dialog")
    playwright.expect(dialog).to_be_visible(timeout=10_000)
    playwright.expect(page.locator("#key-title")).to_have_text(title)
    page.fill("#key-input", key)
    page.click("#key-ok")
    playwright.expect(dialog).to_be_hidden()


def test_with_keys_the_console_asks_and_unloads_and_reloads_iris(page, keyed_server) -> None:
    page.goto(keyed_server.url + "/")
    playwright.expect(page.locator("#key-message")).to_contain_text("API key", timeout=10_000)
    shot(page, "key")
    page.click("#key-cancel")  # refused: the page says why, and its polling does not reopen the dialog
    playwright.expect(page.get_by_test_id("error")).to_contain_text("needs an API key")
    page.wait_for_timeout(3500)  # longer than the models view's refresh
    assert page.locator("#key-dialog").is_visible() is False
    page.click("#key-button")
    answer_key(page, "API key", API_KEY)
    playwright.expect(model_state(page, "iris")).to_have_text("READY", timeout=15_000)
    playwright.expect(model_state(page, "smollm2")).to_have_text("UNAVAILABLE")  # --load-model iris only
    page.locator("[data-model=iris] [data-testid=unload]").click()
    playwright.expect(page.locator("#key-message")).to_contain_text("admin key")  # an API key is not enough
    answer_key(page, "Admin key", ADMIN_KEY)
    playwright.expect(model_state(page, "iris")).to_have_text("UNAVAILABLE", timeout=30_000)
    status = httpx.get(keyed_server.url + "/v2/models/iris/ready", headers={"Authorization": f"Bearer {API_KEY}"})
    assert status.status_code == 503
    page.locator("[data-model=iris] [data-testid=load]").click()  # the admin key is remembered: no second prompt
    playwright.expect(model_state(page, "iris")).to_have_text("READY", timeout=30_000)
    assert page.locator("#key-dialog").is_visible() is False
    # the keys lived in the page's memory only: nothing stored, and a reload asks again
    assert page.evaluate("() => localStorage.length + sessionStorage.length + document.cookie.length") == 0
    page.reload()
    playwright.expect(page.locator("#key-dialog")).to_be_visible(timeout=10_000)
