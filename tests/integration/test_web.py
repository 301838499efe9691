"""The chat page in a real browser: Debian's headless Chromium driven by Playwright.

Real Redis and real gateways with their web port on; browser pages load the page from a
gateway (or from the loopback HAProxy in front of them) and chat with each other and with
a raw TCP client. Each test saves screenshots under CHAT_ARTIFACTS (default
tests/artifacts/, git-ignored): look at them.

Chromium is Debian's package (``apt-get install chromium``; .ci/run installs it), launched
by path: Playwright's own browser downloads cannot work here.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from tests.conftest import Cluster
from tests.deploy_support import ROOT, running_haproxy
from tests.support import T, free_port, run_cli

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("CHAT_ARTIFACTS", ROOT / "tests" / "artifacts"))
PHONE = {"width": 390, "height": 760}
LAPTOP = {"width": 1024, "height": 640}
#: What a page shows as its own status while its link is down.
RECONNECTING = "reconnecting..."


def chromium() -> str:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    return str(CHROMIUM)


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=6 * T * 1000
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, url: str, viewport: dict[str, int] = LAPTOP) -> Page:
    page = await browser.new_page(viewport=viewport)
    page.set_default_timeout(3 * T * 1000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Console errors include any Content-Security-Policy violation; a failed connection
    # attempt while reconnecting is expected.
    page.on(
        "console",
        lambda msg: (
            msg.type == "error"
            and "WebSocket connection to" not in msg.text
            and errors.append(msg.text)
        ),
    )
    page.errors = errors
    await page.goto(url)
    return page


def no_script_errors(page: Page) -> None:
    """No uncaught exception and no console error (a CSP violation would be one)."""
    errors: list[str] = page.errors
    assert not errors, errors


async def log_in(page: Page, name: str) -> None:
    await page.fill("#name", name)
    await page.click("#login-form button")


async def say(page: Page, line: str) -> None:
    await page.fill("#line", line)
    await page.press("#line", "Enter")


def line_with(page: Page, text: str, kind: str = "") -> Locator:
    """The last line of the page's log containing ``text`` (with class ``kind``)."""
    return page.locator(f"#log li{'.' + kind if kind else ''}", has_text=text).last


async def shows(page: Page, text: str, kind: str = "") -> str:
    """Wait until the page shows a line containing ``text`` (of kind ``kind``); its text."""
    line = page.locator(f"#log li{'.' + kind if kind else ''}", has_text=text).last
    await expect(line).to_be_visible()
    body = await line.locator(".body").text_content()
    assert body is not None
    return body


async def screenshot(page: Page, name: str) -> Path:
    path = artifact(f"{name}.png")
    await page.screenshot(path=str(path))
    return path


async def who(cluster: Cluster) -> dict[str, tuple[str, str]]:
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "who", "--json"
    )
    assert status == 0, err
    return {u["name"]: (u["gateway"], u["room"]) for u in json.loads(out)}


async def test_two_pages_and_a_tcp_client_chat_in_two_rooms(
    cluster: Cluster, browser: Browser
) -> None:
    """Two pages on two gateways and a TCP client: the name form shows the server's
    refusals; history is marked as history; joins and leaves, one's own lines, others'
    lines (a colour per name) and private messages each look different; the room is
    shown and follows /join; /who and /rooms answer in the page; text that looks like
    HTML or script is shown as typed and never runs."""
    await cluster.start(2, "--web-port", "0")
    gw1, gw2 = cluster.gateways
    carol = await cluster.user(1, "carol")
    await carol.send("said before the pages came")
    await carol.expect("carol: said before the pages came")

    ana = await open_page(browser, f"http://127.0.0.1:{gw1.web_port}/", PHONE)
    await expect(ana.locator("#name")).to_be_visible()
    await log_in(ana, "no spaces allowed")
    await expect(ana.locator("#login-error")).to_contain_text("invalid name")
    await log_in(ana, "Carol")
    await expect(ana.locator("#login-error")).to_have_text(
        "the name Carol is taken; choose another"
    )
    await screenshot(ana, "page-name-refused")
    await log_in(ana, "ana")
    assert (await shows(ana, "Welcome, ana!", "notice")).startswith("Welcome, ana! 2 users")
    history = await shows(ana, "said before the pages came", "history")
    assert re.fullmatch(r"history \d{4}-\d\d-\d\d \d\d:\d\d UTC carol: said before.*", history)
    await expect(ana.locator("#room")).to_have_text("#lobby")
    assert await carol.readline() == "* ana joined the chat"

    bruno = await open_page(browser, f"http://127.0.0.1:{gw2.web_port}/")
    await log_in(bruno, "bruno")
    await shows(bruno, "Welcome, bruno!")
    await shows(ana, "bruno joined the chat", "presence")
    assert await carol.readline() == "* bruno joined the chat"

    # Chat in #lobby, across gateways and transports.
    await say(ana, "hello from a phone")
    assert await carol.readline() == "ana: hello from a phone"
    await shows(ana, "hello from a phone", "mine")
    line = line_with(bruno, "hello from a phone", "chat")
    await expect(line).not_to_have_class(re.compile(r"\bmine\b"))
    await carol.send("hi from nc")
    assert await carol.readline() == "carol: hi from nc"
    await shows(ana, "carol: hi from nc", "chat")
    await shows(bruno, "carol: hi from nc", "chat")
    # Text that looks like HTML or script is text.
    trap = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b> & co'
    await say(bruno, trap)
    assert await carol.readline() == f"bruno: {trap}"
    assert await shows(ana, "window.pwned=2", "chat") == f"bruno: {trap}"
    assert await ana.evaluate("window.pwned") is None
    assert await ana.locator("#log img, #log script, #log b").count() == 0
    colours = {
        name: await ana.locator(".name", has_text=name).first.evaluate(
            "e => getComputedStyle(e).color"
        )
        for name in ("ana", "carol", "bruno")
    }
    assert len(set(colours.values())) == 3, colours

    # Commands typed as on a terminal.
    await say(ana, "/who")
    await shows(ana, "3 users online:", "notice")
    await shows(ana, "  carol", "notice")

    # A second room.
    await say(ana, "/join #math")
    await expect(ana.locator("#room")).to_have_text("#math")
    await shows(bruno, "ana left for #math", "presence")
    await say(bruno, "/join #math")
    await shows(ana, "bruno joined #math", "presence")
    await carol.send("/join #math")
    await carol.expect("* You are in #math now: 3 users here.")
    await say(ana, "/rooms")
    await shows(ana, "#math: 3 users", "notice")
    await say(bruno, "in the math room")
    await shows(ana, "bruno: in the math room")
    assert await carol.readline() == "bruno: in the math room"

    # A private message between the two pages; carol sees none of it.
    await say(ana, "/msg bruno just between us")
    assert await shows(ana, "just between us", "private") == "private to bruno ana: just between us"
    await expect(line_with(ana, "just between us", "private")).to_have_class(
        re.compile(r"\bmine\b")
    )
    assert await shows(bruno, "just between us", "private") == "private ana: just between us"
    await say(ana, "back in public")
    assert await carol.readline() == "ana: back in public"

    await shows(bruno, "ana: back in public")
    await screenshot(bruno, "page-laptop")
    await screenshot(ana, "page-phone")
    no_script_errors(ana)
    no_script_errors(bruno)


async def test_the_page_reconnects_after_its_gateway_stops(
    cluster: Cluster, browser: Browser
) -> None:
    """Through the loopback HAProxy (deploy/haproxy.cfg's web frontend, WebSocket
    upgrades passed through): when the page's gateway is stopped, it shows
    "reconnecting...", comes back on the other gateway under the same name, in the room it
    was in, and what is typed there reaches a TCP user in that room."""
    gateways = await cluster.start(2, "--web-port", "0", "--health-port", "0")
    servers = [(g.port, g.health_port, g.web_port) for g in gateways]
    async with running_haproxy(free_port(), servers, web_port=free_port()) as lb:
        assert lb.web_port is not None
        page = await open_page(browser, f"http://127.0.0.1:{lb.web_port}/")
        await log_in(page, "dana")
        await shows(page, "Welcome, dana!")
        await say(page, "/join #art")
        await expect(page.locator("#room")).to_have_text("#art")
        where = await who(cluster)
        assert where["dana"][1] == "#art"
        index = [g.gateway_id for g in gateways].index(where["dana"][0])
        stopped, other = gateways[index], gateways[1 - index]
        erin = await cluster.user(1 - index, "erin")
        await erin.send("/join #art")
        await erin.expect("* You are in #art now: 2 users here.")
        await shows(page, "erin joined #art", "presence")

        stopped.signal(signal.SIGTERM)
        await shows(page, "Server restarting: please reconnect.", "notice")
        await shows(page, "connection lost: reconnecting...", "local")
        await shows(page, "back in the chat as dana", "local")
        await expect(page.locator("#status")).to_have_text("connected")
        await expect(page.locator("#log li", has_text="You are in #art now")).to_have_count(2)
        await expect(page.locator("#room")).to_have_text("#art")
        assert await stopped.wait(3 * T) == 0
        assert (await who(cluster))["dana"] == (other.gateway_id, "#art")
        await say(page, "back on the other gateway")
        assert await erin.expect("dana: back on the other gateway")
        await screenshot(page, "page-reconnected")
        no_script_errors(page)


async def test_the_page_says_reconnecting_while_no_gateway_answers(
    cluster: Cluster, browser: Browser
) -> None:
    """With its only gateway gone the page says so ("reconnecting...") and keeps what is
    typed meanwhile; when a gateway is back on that port it logs in again as before and
    sends it."""
    (gateway,) = await cluster.start(1, "--web-port", "0")
    port = gateway.web_port
    page = await open_page(browser, f"http://127.0.0.1:{port}/")
    await log_in(page, "fred")
    await shows(page, "Welcome, fred!")
    await gateway.stop()
    await expect(page.locator("#status")).to_have_text(RECONNECTING)
    await say(page, "typed while away")
    await shows(page, "typed while away", "local")
    await screenshot(page, "page-reconnecting")
    (restarted,) = await cluster.start(1, "--web-port", str(port))
    watcher = await cluster.user(len(cluster.gateways) - 1, "gina")
    # The page's backoff may have grown to its cap (10 s) while the gateway was away.
    line = page.locator("#log li.local", has_text="back in the chat as fred")
    await expect(line).to_be_visible(timeout=6 * T * 1000)
    # Live, or as history if the page was back before gina.
    assert await watcher.expect(lambda line: line.endswith("fred: typed while away"), 6 * T)
    assert restarted.web_port == port
    # Said once for the outage, not once per failed attempt.
    await expect(page.locator("#log li.local", has_text="connection lost")).to_have_count(1)
    no_script_errors(page)
