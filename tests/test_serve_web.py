"""End-to-end test of the web page at /ui/: a real server (tiny-llama) and Debian's headless
Chromium driven by Playwright. CI installs /usr/bin/chromium (.ci/run); without it the tests skip.
"""

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import requests

from conftest import ROOT, SUPPORT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY, TENANT = "sk-web-test", "webtenant"
KB_FILES = ["warranty_zh.md", "shipping_zh.md", "returns_en.md"]
QUESTION = "扫地机器人 S1 的保修期是多久？"
WAIT_MS = 30_000

# ~30 s in all: the server start (model load, KB indexing) is most of it
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def chromium_or_skip() -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium missing); "
                    "install it with `apt-get install -y chromium` (.ci/run does)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    chromium_or_skip()
    from llmtech.serve.launch import Server

    tmp = tmp_path_factory.mktemp("serve_web")
    kb = tmp / "kb"
    kb.mkdir()
    for name in KB_FILES:  # a small shared KB so start-up indexing is quick
        shutil.copy(SUPPORT / "kb" / name, kb / name)
    srv = Server(["generation.model=tiny-llama", f"data_dir={tmp / 'data'}", f"kb_docs={kb}",
                  f"api_keys={{{KEY}: {TENANT}}}"])
    with srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)  # the first answer also warms the model up
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser context (empty localStorage) on the page; fails on any JS error."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, locale="zh-CN")
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda d: d.accept())  # the page confirms deletions
    pg.set_default_timeout(WAIT_MS)
    pg.goto(server.url + "/ui/")
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def api(server, method, path, **kw):
    r = requests.request(method, server.url + path, timeout=60,
                         headers={"Authorization": f"Bearer {KEY}"}, **kw)
    r.raise_for_status()
    return r.json()


def enter_key(pg, key):
    pg.click("#tab-settings")
    pg.fill("#api-key", key)
    pg.click("#settings-save")


def ask(pg, question, n):
    """Send a question in the chat view and wait for the n-th (0-based) answer to finish."""
    from playwright.sync_api import expect

    pg.click("#tab-chat")
    pg.fill("#chat-input", question)
    pg.press("#chat-input", "Enter")
    answer = pg.locator(".message.assistant").nth(n)
    expect(answer).to_have_class(re.compile(r"\bdone\b"))
    return answer


def ask_failing(pg, question):
    """Send a question whose answer must fail; return the failed answer."""
    from playwright.sync_api import expect

    pg.click("#tab-chat")
    pg.fill("#chat-input", question)
    pg.press("#chat-input", "Enter")
    answer = pg.locator(".message.assistant").last
    expect(answer).to_have_class(re.compile(r"\bfailed\b"))
    return answer


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_wrong_key_shows_error(page):
    from playwright.sync_api import expect

    enter_key(page, "sk-not-a-real-key")
    expect(page.locator("#settings-msg.error")).to_contain_text("401")
    expect(page.locator("#settings-msg")).to_contain_text("invalid API key")
    expect(page.locator("#banner")).to_be_visible()
    expect(page.locator("#banner")).to_contain_text("API 密钥无效")
    # a chat with the wrong key fails in the page too, and does not hang
    answer = ask_failing(page, "你好")
    expect(answer.locator(".error-box")).to_contain_text("401")


def test_datasets_upload_parse_and_chat(page, server, tmp_path):
    from playwright.sync_api import expect

    pg = page
    sent: list[dict] = []  # the bodies of the page's chat requests
    pg.on("request", lambda r: sent.append(json.loads(r.post_data))
          if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)

    # ---- settings: the key is checked, the models come from GET /v1/models
    enter_key(pg, KEY)
    expect(pg.locator("#settings-msg.ok")).to_contain_text("密钥有效")
    assert pg.evaluate("localStorage.getItem('llmtech.apiKey')") == KEY
    models = [m["id"] for m in api(server, "GET", "/v1/models")["data"]]
    assert pg.locator("#model-select option").evaluate_all(
        "opts => opts.map(o => o.value)") == models
    assert pg.input_value("#model-select") == "llmtech-kb"
    assert pg.input_value("#source-select") == ""          # shared KB by default
    pg.fill("#max-tokens", "16")
    pg.locator("#max-tokens").dispatch_event("change")
    expect(pg.locator("#health-table")).to_contain_text("tiny-llama")
    expect(pg.locator("#health-badge")).to_contain_text("服务正常")

    # ---- datasets: create one, upload a Markdown file, parse it, watch it finish
    pg.click("#tab-datasets")
    pg.fill("#ds-name", "产品手册")
    pg.click("#ds-create-form button[type=submit]")
    expect(pg.locator("#ds-title")).to_have_text("产品手册")
    (ds,) = [d for d in api(server, "GET", "/api/v1/datasets")["data"] if d["name"] == "产品手册"]

    note = tmp_path / "battery_note.md"
    note.write_text("# 电池说明\n\n云杉扫地机器人 S1 的电池续航约 120 分钟，充满电需要 4 小时。\n"
                    "电池属于易损件，保修 12 个月。\n", encoding="utf-8")
    pg.set_input_files("#upload-files", str(note))
    pg.click("#upload-btn")
    row = pg.locator("tr.doc-row", has_text="battery_note.md")
    expect(row).to_have_attribute("data-run", "UNSTART")
    row.locator(".parse-btn").click()
    expect(row).to_have_attribute("data-run", "DONE")
    expect(row.locator(".state")).to_have_text("完成")
    (doc,) = api(server, "GET", f"/api/v1/datasets/{ds['id']}/documents")["data"]["docs"]
    assert doc["run"] == "DONE" and doc["chunk_count"] >= 1
    expect(row.locator(".chunk-count")).to_have_text(str(doc["chunk_count"]))
    expect(row.locator(".progress")).to_have_attribute("aria-valuenow", "100")

    # an unsupported type: the page shows the server's 415 message
    bad = tmp_path / "tool.exe"
    bad.write_bytes(b"MZ not a document")
    pg.set_input_files("#upload-files", str(bad))
    pg.click("#upload-btn")
    msg = pg.locator("#upload-msg.error")
    expect(msg).to_contain_text("415")
    expect(msg).to_contain_text("tool.exe: file type '.exe' is not supported")
    expect(pg.locator("tr.doc-row")).to_have_count(1)
    pg.screenshot(path=str(tmp_path / "datasets.png"), full_page=True)

    # a second dataset, deleted again from the page
    pg.fill("#ds-name", "临时")
    pg.click("#ds-create-form button[type=submit]")
    expect(pg.locator("#ds-title")).to_have_text("临时")
    pg.locator(".ds-item", has_text="临时").locator("button", has_text="删除").click()
    expect(pg.locator(".ds-item")).to_have_count(1)
    assert [d["name"] for d in api(server, "GET", "/api/v1/datasets")["data"]] == ["产品手册"]

    # ---- chat against the shared KB: streamed answer, references as the API gives them
    answer = ask(pg, QUESTION, 0)
    assert sent[-1]["stream"] is True and sent[-1]["max_tokens"] == 16
    assert "dataset_ids" not in sent[-1]
    want = api(server, "POST", "/v1/chat/completions", json={
        "model": "llmtech-kb", "max_tokens": 4,
        "messages": [{"role": "user", "content": QUESTION}]})["references"]
    assert want, "the shared KB returned no passages for the test question"
    items = answer.locator("li.ref")
    expect(items).to_have_count(len(want))
    for i, ref in enumerate(want):
        item = items.nth(i)
        expect(item.locator(".ref-name")).to_have_text(ref["document_name"])
        expect(item.locator(".ref-sim")).to_contain_text(f"{ref['score']:.3f}")
        expect(item.locator(".tag")).to_have_text("已引用" if ref["cited"] else "未引用")
    items.nth(0).locator(".ref-link").click()
    panel = pg.locator("#ref-panel")
    expect(panel).to_be_visible()
    expect(pg.locator("#ref-title")).to_have_text(f"[1] {want[0]['document_name']}")
    assert pg.locator("#ref-text").text_content() == want[0]["content"]
    shot = ROOT / "runs" / "serve_ui.png"
    shot.parent.mkdir(exist_ok=True)
    pg.screenshot(path=str(shot), full_page=True)
    width, height = png_size(shot)
    assert width >= 1280 and height >= 800 and shot.stat().st_size > 20_000
    pg.click("#ref-close")
    expect(panel).to_be_hidden()

    # ---- second turn, answered from the dataset: the history and dataset_ids are sent
    pg.click("#tab-settings")
    pg.select_option("#source-select", ds["id"])
    answer = ask(pg, "S1 的电池续航多久？", 1)
    body = sent[-1]
    assert body["dataset_ids"] == [ds["id"]]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"] == QUESTION
    expect(answer.locator(".ref-name").first).to_have_text("battery_note.md")
    answer.locator(".ref-link").first.click()
    assert "120 分钟" in pg.locator("#ref-text").text_content()

    # ---- the dataset disappears behind the page's back: the chat shows the API's 404
    api(server, "DELETE", "/api/v1/datasets", json={"ids": [ds["id"]]})
    failed = ask_failing(pg, "还在吗？")
    expect(failed.locator(".error-box")).to_contain_text("404")
    expect(failed.locator(".error-box")).to_contain_text(f"dataset {ds['id']} not found")
    # … and the page falls back to the shared KB
    expect(failed).to_contain_text("回答依据已切换回共享知识库")
    expect(pg.locator("#chat-source")).to_contain_text("共享知识库")
    assert pg.evaluate("localStorage.getItem('llmtech.source')") == ""


def test_citation_links_and_busy_error(page, server):
    """Front-end only: [n] markers in an answer become links, and a 429 is shown. The chat
    endpoint is answered by Playwright here (a tiny random model never writes [n], and a
    busy server is hard to time), with the exact SSE framing the server uses."""
    from playwright.sync_api import expect

    pg = page
    enter_key(pg, KEY)
    expect(pg.locator("#settings-msg.ok")).to_be_visible()
    pg.fill("#max-tokens", "40")
    pg.locator("#max-tokens").dispatch_event("change")
    pg.select_option("#model-select", "tiny-llama")
    pg.reload()                                         # the settings live in localStorage
    expect(pg.locator("#model-select")).to_have_value("tiny-llama")
    assert pg.input_value("#api-key") == KEY and pg.input_value("#max-tokens") == "40"
    expect(pg.locator("#chat-source")).to_contain_text("直接对话")
    pg.click("#tab-settings")
    pg.select_option("#model-select", "llmtech-kb")
    refs = [{"n": 1, "id": "a#0", "document_id": "a.md", "document_name": "<b>保修</b>",
             "dataset_id": None, "content": "第一段 <script>x</script>", "score": 0.91,
             "cited": True},
            {"n": 2, "id": "b#0", "document_id": "b.md", "document_name": "退货",
             "dataset_id": None, "content": "第二段全文", "score": 0.42, "cited": True}]
    pieces = ["保修 24 个月", "[1]；退货见 [2]", "，另见 [7]。"]
    events = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
              for p in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "references": refs})
    sse = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events)
    sse += "data: [DONE]\n\n"
    pg.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=sse))
    answer = ask(pg, "保修多久？", 0)
    text = answer.locator(".bubble-text")
    expect(text).to_have_text("保修 24 个月[1]；退货见 [2]，另见 [7]。")
    expect(text.locator("a.cite")).to_have_count(2)           # [7] has no passage: plain text
    text.locator("a.cite[data-n='2']").click()
    assert pg.locator("#ref-text").text_content() == "第二段全文"
    text.locator("a.cite[data-n='1']").click()
    # server text is inserted as text, never as markup
    expect(pg.locator("#ref-title")).to_have_text("[1] <b>保修</b>")
    assert pg.locator("#ref-text").text_content() == refs[0]["content"]
    assert pg.locator("#ref-panel b, #ref-panel script").count() == 0

    pg.unroute("**/v1/chat/completions")
    busy = {"error": {"message": "too many requests: 1 generating and 8 queued; retry later",
                      "type": "rate_limit_error", "code": 429}}
    pg.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=429, content_type="application/json", body=json.dumps(busy)))
    failed = ask_failing(pg, "再问一次")
    expect(failed.locator(".error-box")).to_contain_text("服务器繁忙")
    expect(failed.locator(".error-box")).to_contain_text("429")
    expect(failed.locator(".error-box")).to_contain_text("too many requests")
