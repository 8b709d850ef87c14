"""The jobs page in a real headless Chromium, against C{twistd -n twistnet-http} as the README
starts it: jobs submitted from the generated forms, live output, cancel, a token, a restart."""

from __future__ import annotations

import re
import shlex
import sys

from playwright.sync_api import expect

from browser_support import EXPECT_MS, PHONE, browser, new_page, page_errors, screenshot  # noqa: F401  (fixtures)

HOSTILE = "<script>alert(1)</script><b>bold?</b>"
TOKEN = "page-test-token"
DESKTOP = {"width": 1280, "height": 860}
#: A tool that prints a line at once, then runs until cancelled or stopped.
TICKS = "ticks=" + shlex.join(
    [sys.executable, "-u", "-c", "import time; print('started'); time.sleep(60)"]
)


def start_http(twistd, *args: str, listen: str = "tcp:0:interface=127.0.0.1"):
    server = twistd("twistnet-http", "--listen", listen, *args)
    return server, server.port()


def open_jobs(new_page, port: int, **options):
    page = new_page(**options)
    page.goto(f"http://127.0.0.1:{port}/")
    expect(page.locator("#status")).to_have_text(re.compile(r"^\d+ tools\.$"))
    return page


def submit(page, tool: str, **fields: str) -> str:
    """Fill the generated form of C{tool} and send it with the keyboard; the new job's id."""
    page.locator("#tool").select_option(tool)
    for name, value in fields.items():
        page.locator(f"#param-{name}").fill(value)
    page.locator("#submit-button").focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f]{32}$"))
    return page.url.rsplit("/", 1)[1]


def network_errors(page_errors, status: str) -> list[str]:
    """Take out of C{page_errors} Chromium's own lines about answers with C{status}."""
    seen = [error for error in page_errors if status in error]
    page_errors[:] = [error for error in page_errors if error not in seen]
    return seen


def test_job_from_a_form_runs_and_its_output_status_and_result_appear(
    twistd, new_page, page_errors
):
    server, port = start_http(twistd)
    page = open_jobs(new_page, port, viewport=DESKTOP)
    assert page.locator("#token-box").is_hidden()
    # The form is the tool's schema: echo's text is required, sleep's seconds an integer.
    expect(page.locator("#param-text")).to_have_attribute("maxlength", "1000")
    expect(page.locator("label[for=param-text]")).to_have_text("text (required)")
    page.locator("#tool").select_option("sleep")
    seconds = page.locator("#param-seconds")
    expect(seconds).to_have_attribute("type", "number")
    expect(seconds).to_have_attribute("max", "300")
    expect(seconds).to_have_value("1")

    job_id = submit(page, "echo", text=HOSTILE)
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#output")).to_have_text(HOSTILE + "\n")
    assert page.locator("#output *").count() == 0
    expect(page.locator("#result")).to_contain_text('"exit_code": 0')
    expect(page.locator("#cancel")).to_be_hidden()
    expect(page.locator(f"#job-list a[data-id='{job_id}'] .badge")).to_have_text("succeeded")
    screenshot(page, "http", docs=True)

    # A refusal shows the API's own detail.
    page.locator("#tool").select_option("sleep")
    page.locator("#param-seconds").fill("301")
    page.locator("#submit-button").click()
    expect(page.locator("#submit-error")).to_have_text(
        "400 bad parameter: parameter 'seconds': must be at most 300"
    )
    assert network_errors(page_errors, "400")
    assert server.terminate() == 0


def test_cancel_from_the_page_and_the_list_filters(twistd, new_page, page_errors):
    server, port = start_http(twistd)
    page = open_jobs(new_page, port, viewport=PHONE)
    job_id = submit(page, "sleep", seconds="60")
    expect(page.locator("#job-status")).to_have_text("running")
    cancel = page.locator("#cancel")
    cancel.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(cancel).to_be_hidden()
    expect(page.locator("#result")).to_contain_text('"status": "cancelled"')

    submit(page, "echo", text="kept")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    page.locator("#filter-status").select_option("cancelled")
    expect(page.locator("#job-list a")).to_have_count(1)
    expect(page.locator("#job-list a")).to_have_attribute("data-id", job_id)
    page.locator("#filter-status").select_option("")
    page.locator("#filter-tool").select_option("echo")
    expect(page.locator("#job-list a .badge")).to_have_text(["succeeded"])
    screenshot(page, "http-phone")
    assert server.terminate() == 0


def test_live_output_resumes_after_a_server_restart_without_duplicates(
    twistd, new_page, page_errors
):
    server, port = start_http(twistd, "--tool", TICKS)
    page = open_jobs(new_page, port)
    submit(page, "ticks")
    expect(page.locator("#output")).to_have_text("started\n")
    expect(page.locator("#job-status")).to_have_text("running")
    expect(page.locator("#stream-state")).to_have_text("Following the output live.")
    screenshot(page, "http-live")
    assert server.terminate() == 0

    again, _ = start_http(twistd, "--tool", TICKS, listen=f"tcp:{port}:interface=127.0.0.1")
    # EventSource reconnects by itself, with Last-Event-ID: the job ended with the server.
    expect(page.locator("#stream-state")).to_have_text("Finished.", timeout=EXPECT_MS * 2)
    expect(page.locator("#job-status")).to_have_text("lost")
    expect(page.locator("#job-error")).to_contain_text("server stopped")
    expect(page.locator("#output")).to_have_text("started\n")
    screenshot(page, "http-resumed")
    assert again.terminate() == 0
    # Chromium logs the stream cut by the stop and each refused attempt while the server is
    # down: the network, not the page's script.
    assert network_errors(page_errors, "ERR_INCOMPLETE_CHUNKED_ENCODING")
    network_errors(page_errors, "ERR_CONNECTION_REFUSED")


def test_a_token_protected_server_works_from_the_page(twistd, new_page, page_errors):
    server, port = start_http(twistd, "--token", TOKEN)
    page = new_page(viewport=DESKTOP)
    sent = []
    page.on("request", lambda request: sent.append(request))
    page.goto(f"http://127.0.0.1:{port}/")
    expect(page.locator("#token-box")).to_be_visible()
    expect(page.locator("#token-box")).to_contain_text("never in a URL")

    submit_without = page.locator("#param-text")
    submit_without.fill("no token")
    page.locator("#submit-button").click()
    expect(page.locator("#submit-error")).to_contain_text("401 unauthorized")
    expect(page.locator("#submit-error")).to_contain_text("Type the server's token above")
    expect(page.locator("#token")).to_be_focused()
    assert network_errors(page_errors, "401")

    page.locator("#token").fill(TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#token-state")).to_have_text("Token set, in this page's memory only.")
    submit(page, "echo", text="with a token")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#output")).to_have_text("with a token\n")
    assert page.evaluate("sessionStorage.length") == 0
    screenshot(page, "http-token")

    posts = [request for request in sent if request.method == "POST"]
    assert [request.headers.get("authorization") for request in posts] == [
        None,
        f"Bearer {TOKEN}",
    ]
    assert not [request.url for request in sent if TOKEN in request.url]
    assert server.terminate() == 0
