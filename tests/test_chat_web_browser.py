"""The chat page in a real headless Chromium, against C{twistd -n twistnet-chat --web ...} as
the README starts it, with a telnet-like raw-socket user in the same room."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from browser_support import EXPECT_MS, PHONE, browser, new_page, page_errors, screenshot  # noqa: F401  (fixtures)
from chat_helpers import ChatClient

HOSTILE = "<script>alert(1)</script><b>x</b>"


def start_chat(twistd, web: str = "tcp:0:interface=127.0.0.1"):
    server = twistd("twistnet-chat", "--listen", "tcp:0:interface=127.0.0.1", "--web-listen", web)
    telnet_port = server.port()
    match = server.wait_for_line(r"serving its web page on [^\s]+:(?P<port>\d+) ")
    return server, telnet_port, int(match.group("port"))


def open_chat(new_page, web_port: int, **options):
    page = new_page(**options)
    page.goto(f"http://127.0.0.1:{web_port}/")
    expect(page.locator("#status")).to_have_text("Connected")
    expect(page.locator("#name")).to_have_text(re.compile(r"^guest-\d+$"))
    return page


def test_browser_and_telnet_users_talk_both_ways_and_agree_on_who(twistd, new_page):
    server, telnet_port, web_port = start_chat(twistd)
    with ChatClient(telnet_port, eol=b"\r\n") as telnet:
        telnet.rename("tom")
        page = open_chat(new_page, web_port, viewport=PHONE)
        line = page.locator("#line")
        line.fill("/NAME alice")
        line.press("Enter")
        expect(page.locator("#name")).to_have_text("alice")
        telnet.wait_for(b"is now known as alice")
        expect(page.locator("#who li")).to_have_text(["alice", "tom"])
        expect(line).to_be_focused()

        line.fill("hello from the browser")
        line.press("Enter")
        assert b"alice: hello from the browser" in telnet.wait_for(b"hello from the browser")
        telnet.send("hello from telnet")
        expect(page.locator("#log")).to_contain_text("tom: hello from telnet")

        line.fill("/WHO")
        line.press("Enter")
        expect(page.locator("#log")).to_contain_text("alice tom")
        telnet.send("/WHO")
        assert b"alice tom" in telnet.wait_for(b"alice tom")

        telnet.send(HOSTILE)
        shown = page.locator("#log div").filter(has_text="alice(1)")
        expect(page.locator("#log div").last).to_have_text(f"tom: {HOSTILE}")
        assert page.locator("#log script, #log b").count() == 0
        assert shown.count() == 0
        screenshot(page, "chat", docs=True)
    assert server.terminate() == 0


def test_page_reconnects_after_a_server_restart_and_keeps_its_name(twistd, new_page, page_errors):
    server, _, web_port = start_chat(twistd)
    page = open_chat(new_page, web_port)
    page.locator("#line").fill("/NAME bob")
    page.locator("#line").press("Enter")
    expect(page.locator("#name")).to_have_text("bob")
    server.terminate()
    expect(page.locator("#status")).to_have_text(re.compile("reconnecting", re.I))
    screenshot(page, "chat-reconnecting")

    again, telnet_port, _ = start_chat(twistd, f"tcp:{web_port}:interface=127.0.0.1")
    expect(page.locator("#status")).to_have_text("Connected", timeout=EXPECT_MS * 2)
    expect(page.locator("#name")).to_have_text("bob")
    with ChatClient(telnet_port, eol=b"\r\n") as telnet:
        telnet.send("/WHO")
        assert b"bob" in telnet.wait_for(b"bob")
        telnet.send("welcome back")
        expect(page.locator("#log")).to_contain_text("welcome back")
    assert page.locator("#log div", has_text="*** Welcome to twistnet chat").count() == 1
    screenshot(page, "chat-reconnected")
    assert again.terminate() == 0
    # Chromium itself logs each refused attempt while the server is down: that is the
    # network, not the page's script, which must have raised nothing.
    refused = [error for error in page_errors if "ERR_CONNECTION_REFUSED" in error]
    assert refused and all(error.startswith("console: WebSocket connection") for error in refused)
    page_errors[:] = [error for error in page_errors if error not in refused]


@pytest.mark.parametrize("path", ["/"])
def test_page_is_served_with_strict_headers(twistd, new_page, path):
    _, _, web_port = start_chat(twistd)
    page = new_page()
    response = page.goto(f"http://127.0.0.1:{web_port}{path}")
    headers = response.headers
    assert "'unsafe-inline'" not in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    expect(page.locator("#status")).to_have_text("Connected")
