"""The pictures in docs/connect-service.md of what an admin sees, remade from the running
product: the email and each page of a durable connect link, at desktop width and on a 360 px
phone. Not a test.

    uv run python -m demo.screenshots                 # writes docs/connect-*.png
    uv run python -m demo.screenshots --output /tmp/shots

Starts `onboard emulator`, `onboard smtp-sink` and `onboard connect-server` on free ports (a
temporary folder for the ledger and the mail), emails six tenants of examples/tenants.csv
through `onboard run` with examples/profile-connect.yaml (its ports rewritten to those), then
drives Debian's Chromium (Playwright's `executable_path`; ONBOARD_TEST_CHROMIUM overrides it):
the email as a mail view shows it (its headers, its HTML part), the link page, the emulated
provider's consent page, the "connected" page (Allow), the "declined" one (Deny) and an error
page (a revoked link's 404). The desktop pictures (1024 px wide) are connect-<page>.png, the
phone's (360 px, a mobile viewport at twice the pixel density) connect-<page>-360.png; each is
the whole page, but for a page laid out wider than the phone (no viewport meta tag, as the
emulator's consent page), which is taken as the phone's screen shows it.
"""

from __future__ import annotations

import argparse
import base64
import email
import email.policy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from email.message import EmailMessage
from html import escape
from pathlib import Path
from typing import Any

from demo.emulator_config import DEFAULT_API_KEY
from demo.processes import PROJECT, base_env, child, free_port, wait_for_http

ONBOARD = str(Path(sys.executable).parent / "onboard")
PROFILE = PROJECT / "examples" / "profile-connect.yaml"
ROSTER = PROJECT / "examples" / "tenants.csv"
# The profile's ports: the emulator's and the connect service's defaults.
EMULATOR_PORT, CONNECT_PORT = 8700, 8800
DESKTOP = {"viewport": {"width": 1024, "height": 640}}
PHONE = {
    "viewport": {"width": 360, "height": 740},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}
# Per context: the tenant who connects, the one who declines, the one whose link is revoked.
TENANTS = {"": ("t001", "t002", "t003"), "-360": ("t004", "t005", "t006")}


@dataclass
class Stack:
    emulator: str
    base: str
    mail: Path
    env: dict[str, str]


def start(tmp: Path, stack: ExitStack) -> Stack:
    """The emulator, the SMTP sink and the connect service, and the tenants' emails sent."""
    emulator_port, connect_port, smtp_port = free_port(), free_port(), free_port()
    emulator, base = f"http://127.0.0.1:{emulator_port}", f"http://127.0.0.1:{connect_port}"
    text = PROFILE.read_text(encoding="utf-8")
    text = re.sub(rf"\b{EMULATOR_PORT}\b", str(emulator_port), text)
    text = re.sub(rf"\b{CONNECT_PORT}\b", str(connect_port), text)
    profile = tmp / PROFILE.name
    profile.write_text(text, encoding="utf-8")
    env = base_env(tmp)
    env.update(
        VERSORI_BASE_URL=emulator,
        VERSORI_API_KEY=DEFAULT_API_KEY,
        ONBOARD_DB_URL=f"sqlite:///{tmp / 'onboarding.db'}",
        ONBOARD_CONNECT_BASE_URL=base,
        ONBOARD_SMTP_HOST="127.0.0.1",
        ONBOARD_SMTP_PORT=str(smtp_port),
        ONBOARD_SMTP_SECURITY="none",
        ONBOARD_EMAIL_FROM="Onboarding <onboarding@example.com>",
        # What the pictures show of the brand settings (docs/configuration.md, "Branding").
        ONBOARD_BRAND_NAME="Acme Analytics",
        ONBOARD_BRAND_SUPPORT="support@acme-analytics.example",
        ONBOARD_BRAND_REASON="so that your CRM contacts sync to Acme Analytics every hour",
        ONBOARD_BRAND_PRIVACY_URL="https://acme-analytics.example/privacy",
    )
    emu = stack.enter_context(
        child([ONBOARD, "emulator", "--port", str(emulator_port)], env, tmp / "emulator.log")
    )
    sink_cmd = [ONBOARD, "smtp-sink", "--port", str(smtp_port), "--output", str(tmp / "mail")]
    sink = stack.enter_context(child(sink_cmd, env, tmp / "smtp-sink.log"))
    wait_for_http(f"{emulator}/healthz", proc=emu)
    server_cmd = [ONBOARD, "connect-server", "--port", str(connect_port)]
    server = stack.enter_context(child(server_cmd, env, tmp / "connect-server.log"))
    wait_for_http(f"{base}/healthz", proc=server, found=True)
    if sink.poll() is not None:
        raise RuntimeError((tmp / "smtp-sink.log").read_text())
    only = [a for t in (*TENANTS[""], *TENANTS["-360"]) for a in ("--only", t)]
    print("onboard run: emailing six tenants their durable links (a temporary Prefect server)")
    run = [ONBOARD, "run", "--roster", str(ROSTER), "--profile", str(profile), *only]
    subprocess.run([*run, "--deliver", "email"], env=env, cwd=tmp, check=True, timeout=300)
    for revoked in (TENANTS[""][2], TENANTS["-360"][2]):
        subprocess.run(
            [ONBOARD, "revoke", "--tenant", revoked], env=env, cwd=tmp, check=True, timeout=60
        )
    return Stack(emulator, base, tmp / "mail", env)


def newest_email(folder: Path, tenant: str) -> EmailMessage:
    found = None
    deadline = time.monotonic() + 10
    while found is None and time.monotonic() < deadline:
        for path in sorted(folder.glob("*.eml")):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if isinstance(message, EmailMessage) and message["X-Onboarding-Tenant"] == tenant:
                found = message
        time.sleep(0.1)
    if found is None:
        raise RuntimeError(f"no email to {tenant} in {folder}")
    return found


def link_in(message: EmailMessage, base: str) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert isinstance(body, EmailMessage)
    found = re.search(re.escape(base) + r"/c/[A-Za-z0-9_-]+", body.get_content())
    if found is None:
        raise RuntimeError("the email carries no durable link")
    return found.group(0)


def mail_view(message: EmailMessage) -> str:
    """A plain mail view: From, To, Subject above the HTML part (in an iframe, as mail apps
    isolate it), its cid: images inlined."""
    part = message.get_body(preferencelist=("html",))
    assert isinstance(part, EmailMessage), "the email has no HTML part"
    html = str(part.get_content())
    for attached in message.walk():
        cid = str(attached.get("Content-ID") or "").strip("<>")
        if cid and isinstance(attached, EmailMessage):
            payload = attached.get_payload(decode=True)
            raw = payload if isinstance(payload, bytes) else b""
            data = base64.b64encode(raw).decode()
            html = html.replace(f"cid:{cid}", f"data:{attached.get_content_type()};base64,{data}")
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<style>body{margin:0;font-family:Arial,Helvetica,sans-serif;background:#fff}"
        ".head{padding:14px 16px;border-bottom:1px solid #e3e3e3;font-size:13px;color:#333;"
        "background:#f7f7f8}.head span{display:inline-block;min-width:3.5em;color:#777}"
        ".subject{font-size:17px;font-weight:bold;margin-bottom:6px}"
        "iframe{border:0;width:100%;display:block}</style></head><body>"
        f'<div class="head"><div class="subject">{escape(str(message["Subject"]))}</div>'
        f"<div><span>From</span>{escape(str(message['From']))}</div>"
        f"<div><span>To</span>{escape(str(message['To']))}</div></div>"
        f'<iframe id="mail" srcdoc="{escape(html, quote=True)}"></iframe></body></html>'
    )


def shoot(page: Any, output: Path, name: str) -> None:
    """The whole page; but a page wider than the viewport (one without a viewport meta tag
    on the phone, laid out 980 px wide and zoomed out) as the screen shows it."""
    path = output / f"connect-{name}.png"
    fits = page.evaluate("document.documentElement.scrollWidth") <= page.viewport_size["width"]
    page.screenshot(path=str(path), full_page=fits)
    print(f"  {path}")


def pictures(stack: Stack, browser: Any, output: Path) -> None:
    from playwright.sync_api import expect

    for suffix, options in (("", DESKTOP), ("-360", PHONE)):
        connects, declines, revoked = TENANTS[suffix]
        context = browser.new_context(**options)
        try:
            page = context.new_page()
            message = newest_email(stack.mail, connects)
            page.set_content(mail_view(message))
            page.wait_for_function(
                "document.getElementById('mail').contentDocument.readyState === 'complete'"
            )
            page.evaluate(
                "() => { const f = document.getElementById('mail');"
                " f.style.height = f.contentDocument.documentElement.scrollHeight + 'px'; }"
            )
            shoot(page, output, f"email{suffix}")

            page.goto(link_in(message, stack.base))
            expect(page.locator("form button").first).to_be_visible()
            shoot(page, output, f"link{suffix}")
            page.locator("form button").first.click()
            expect(page).to_have_url(re.compile(re.escape(stack.emulator) + "/provider/"))
            shoot(page, output, f"consent{suffix}")
            page.click("#allow")
            expect(page).to_have_url(re.compile(re.escape(stack.base) + r"/callback\?"))
            shoot(page, output, f"connected{suffix}")

            page.goto(link_in(newest_email(stack.mail, declines), stack.base))
            page.locator("form button").first.click()
            page.click("#deny")
            expect(page).to_have_url(re.compile(re.escape(stack.base) + r"/callback\?"))
            shoot(page, output, f"declined{suffix}")

            answer = page.goto(link_in(newest_email(stack.mail, revoked), stack.base))
            assert answer is not None and answer.status == 404, "a revoked link answers 404"
            shoot(page, output, f"error{suffix}")
        finally:
            context.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=PROJECT / "docs", help="the folder")
    args = parser.parse_args()
    chromium = os.environ.get("ONBOARD_TEST_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        print("No chromium on PATH (apt-get install chromium).", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    args.output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="onboard-screenshots-"))
    try:
        with ExitStack() as stack:
            running = start(tmp, stack)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
                )
                try:
                    pictures(running, browser, args.output)
                finally:
                    browser.close()
        log = (tmp / "connect-server.log").read_text()
        if "Traceback" in log:
            print(log, file=sys.stderr)
            return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
