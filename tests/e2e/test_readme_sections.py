"""The docs' "Run it on your own roster" (docs/your-roster.md) and then "Connect links and the
callback" (docs/connect-service.md), run as a reader would: every ```bash block of the two
sections, taken from their pages by heading, in order, its commands as written, then Chromium
from the durable link in the email the sink wrote, through the button and the emulated
provider's consent, to the "connected" page. (The file keeps its name from when both sections
were the README's.)

How the blocks are run:
- `# shell N` comments say which shell the lines after them belong to; each shell keeps the
  variables its `export` lines set (evaluated by bash). The long-running commands (`onboard
  emulator`, `smtp-sink`, `connect-server`) start in the background, in their shell, and are
  waited for on their `--port`; every other command runs with `bash -c` and must exit 0.
- A block right after `<!-- tests/e2e/test_readme_sections.py skips the next block ... -->`
  (one that needs a Versori account) is not run.
- Once a command has printed a durable link (`.../c/<token>`), Chromium opens it before the
  next block runs, as the reader is told to between the two blocks.

What differs from a reader's terminal, and why:
- The ports: the docs' fixed 8700 (emulator), 8800 (connect-server) and 8025 (SMTP sink)
  may be taken by another test of the parallel suite, so each is replaced by a free port, the
  same one everywhere: in the commands and in the copy of examples/ the commands read.
- The folder: a temporary one (the commands' cwd) holding that copy of examples/, where the
  ledger, links.csv and smtp-sink/ land, as they would in the clone's root.
- `uv run X` runs X from this virtualenv (a bash function `uv`, its bin folder first on PATH):
  no `uv sync` of the shared environment from inside the suite.
- Each shell starts with a private PREFECT_HOME and PREFECT_API_URL set to the session's
  Prefect server, so each `onboard run`/`remind` does not start a temporary server of its
  own (15 s each).
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.processes import PROJECT, base_env, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# (page, heading): the sections run, in this order.
SECTIONS = (
    (PROJECT / "docs" / "your-roster.md", "Run it on your own roster"),
    (PROJECT / "docs" / "connect-service.md", "Connect links and the callback"),
)
SKIP_MARK = "<!-- tests/e2e/test_readme_sections.py skips the next block"
# The docs' fixed ports: the emulator's, the connect service's, the SMTP sink's.
DOC_PORTS = (8700, 8800, 8025)
LONG_RUNNING = re.compile(r"\bonboard (emulator|smtp-sink|connect-server)\b")
SHELL = re.compile(r"^#\s*shell (\d+)\b")
CHROMIUM = os.environ.get("ONBOARD_TEST_CHROMIUM") or shutil.which("chromium")
VENV_BIN = Path(sys.executable).parent
# Before each command: `uv run X` is X from this virtualenv; a failing pipe fails the line.
PRELUDE = (
    'set -o pipefail\nuv() { if [ "$1" = run ]; then shift; "$@"; else command uv "$@"; fi; }\n'
)
# examples/profile-connect.yaml's system (the emulator's DEMO_CRM).
CONNECT_SYSTEM = "01M8F12B95S4BX0QFB3TPDWZ0W"


@dataclass
class Block:
    section: str
    lines: list[str]


def section_blocks(text: str, heading: str, page: str = "README.md") -> list[Block]:
    """The ```bash blocks of the section headed `<heading>` at any level (up to the next
    heading of any level), but those right after the skip mark."""
    lines = text.splitlines()
    starts = (
        i for i, line in enumerate(lines) if re.match(rf"#{{1,6}} {re.escape(heading)}", line)
    )
    start = next(starts, None)
    assert start is not None, f"{page} has no section headed '{heading}'"
    blocks: list[Block] = []
    skip_next = False
    i = start + 1
    while i < len(lines) and not re.match(r"#{1,6} ", lines[i]):
        line = lines[i]
        if line.startswith(SKIP_MARK):
            skip_next = True
        elif line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if line.strip() == "```bash" and not skip_next:
                blocks.append(Block(heading, lines[i + 1 : end]))
            skip_next = False
            i = end
        elif line.strip():
            skip_next = skip_next and line.startswith("<!--")
        i += 1
    return blocks


def commands(block: Block) -> Iterator[tuple[str | None, str]]:
    """(the shell a `# shell N` comment named, or None: the one before; the command), a
    line ending in a backslash joined to the next."""
    pending = ""
    for raw in block.lines:
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            named = SHELL.match(stripped)
            if named:
                yield named.group(1), ""
            continue
        yield None, stripped


@dataclass
class Shell:
    name: str
    env: dict[str, str]
    outputs: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Reader:
    """The reader's terminals: their shells, the folder, and what is running."""

    cwd: Path
    start_env: dict[str, str]
    stack: ExitStack
    shells: dict[str, Shell] = field(default_factory=dict)
    background: dict[str, Path] = field(default_factory=dict)

    def shell(self, name: str) -> Shell:
        if name not in self.shells:
            self.shells[name] = Shell(name, dict(self.start_env))
        return self.shells[name]

    def run(self, shell: Shell, command: str) -> str:
        if command.startswith("export "):
            shell.env = exported(shell.env, command, self.cwd)
            return ""
        if LONG_RUNNING.search(command):
            self.start(shell, command)
            return ""
        done = subprocess.run(
            ["bash", "-c", PRELUDE + command],
            env=shell.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, (
            f"shell {shell.name}: `{command}` exited {done.returncode}\n"
            f"{done.stdout}\n{done.stderr}"
        )
        shell.outputs.append((command, done.stdout))
        return done.stdout

    def start(self, shell: Shell, command: str) -> None:
        port = re.search(r"--port (\d+)", command)
        which = LONG_RUNNING.search(command)
        assert port and which, f"shell {shell.name}: `{command}` names no --port to wait for"
        log = self.cwd / f"shell-{shell.name}.log"
        proc = self.stack.enter_context(background(command, shell.env, self.cwd, log))
        wait_for_port(int(port.group(1)), proc, log)
        self.background[which.group(1)] = log


def exported(env: dict[str, str], command: str, cwd: Path) -> dict[str, str]:
    """The shell's variables after the `export` line, as bash sets them."""
    done = subprocess.run(
        ["bash", "-c", f"{command}\nenv -0"],
        env=env,
        cwd=cwd,
        capture_output=True,
        check=True,
        timeout=30,
    )
    after = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    changed = {k: v for k, v in after.items() if env.get(k) != v}
    for k in ("_", "SHLVL", "PWD", "OLDPWD"):
        changed.pop(k, None)
    return {**env, **changed}


@contextmanager
def background(command: str, env: dict[str, str], cwd: Path, log: Path) -> Iterator[Any]:
    """A long-running command in its own process group, stopped as Ctrl-C stops it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", PRELUDE + command],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def wait_for_port(port: int, proc: Any, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()}"
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port} after {timeout} s:\n{log.read_text()}")


def with_ports(text: str, ports: dict[int, int]) -> str:
    for old, new in ports.items():
        text = re.sub(rf"\b{old}\b", str(new), text)
    return text


def newest_email(folder: Path, tenant: str) -> Any:
    """The tenant's newest message in the sink's folder (files are numbered in arrival order)."""
    found = None
    for path in sorted(folder.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if message["X-Onboarding-Tenant"] == tenant:
            found = message
    assert found is not None, f"no email to {tenant} in {folder}"
    return found


def link_in(message: Any, connect_port: int) -> str:
    text = message.get_body(preferencelist=("plain",)).get_content()
    links = re.findall(rf"http://127\.0\.0\.1:{connect_port}/c/[A-Za-z0-9_-]+", text)
    assert len(set(links)) == 1, text
    return str(links[0])


def click_through(link: str, emulator: str, base: str) -> str:
    """In Chromium: the link page, its button, Allow on the consent page; the last page's h1."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            opened = page.goto(link)
            assert opened is not None and opened.status == 200
            # The pages' words are theirs (tests/e2e/test_connect_browser.py checks them): here
            # only the way through, and that the last page says connected.
            page.locator("form button").first.click()
            expect(page).to_have_url(re.compile(re.escape(emulator) + "/provider/authorize"))
            with page.expect_response(lambda r: r.url.startswith(f"{base}/callback?")) as back:
                page.click("#allow")
            assert back.value.status == 200
            expect(page.locator("h1")).to_contain_text(re.compile("connected", re.IGNORECASE))
            return str(page.locator("h1").inner_text())
        finally:
            browser.close()


def test_run_it_on_your_own_roster_then_connect_links_as_written(
    tmp_path: Path, prefect_api: str
) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    blocks = [
        b
        for page, heading in SECTIONS
        for b in section_blocks(page.read_text(encoding="utf-8"), heading, page.name)
    ]
    written = "\n".join(line for b in blocks for line in b.lines)
    for needed in (
        "onboard emulator",
        "onboard smtp-sink",
        "onboard connect-server",
        "--profile examples/profile-connect.yaml",
        "onboard status",
    ):
        assert needed in written, f"the docs' blocks no longer hold `{needed}`"

    ports = {old: free_port() for old in DOC_PORTS}
    emulator, connect, _smtp = (ports[p] for p in DOC_PORTS)
    shutil.copytree(PROJECT / "examples", tmp_path / "examples")
    for profile in (tmp_path / "examples").glob("*.yaml"):
        profile.write_text(with_ports(profile.read_text(encoding="utf-8"), ports))
    start_env = base_env(tmp_path)
    start_env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{start_env.get('PATH', '')}", PREFECT_API_URL=prefect_api
    )
    emulator_url = f"http://127.0.0.1:{emulator}"
    base = f"http://127.0.0.1:{connect}"

    started = time.monotonic()
    with ExitStack() as stack:
        reader = Reader(tmp_path, start_env, stack)
        current = reader.shell("1")
        clicked: str | None = None
        for block in blocks:
            for named, command in commands(block):
                if named is not None:
                    current = reader.shell(named)
                    continue
                output = reader.run(current, with_ports(command, ports))
                printed = re.findall(rf"{re.escape(base)}/c/[A-Za-z0-9_-]+", output)
                if printed and clicked is None:
                    # The reader opens the link the command printed: the one in t001's email.
                    assert printed == [
                        link_in(newest_email(tmp_path / "smtp-sink", "t001"), connect)
                    ]
                    clicked = click_through(printed[0], emulator_url, base)
        assert clicked is not None, "no block printed t001's durable link for the browser"
        assert set(reader.background) == {"emulator", "smtp-sink", "connect-server"}

        # What the commands said: t002 connected by hand (first section); t001 through the
        # service, once, with the emulator's connection; t002's durable link withdrawn.
        said = {c: out for shell in reader.shells.values() for c, out in shell.outputs}
        assert any("Tenant t002 is connected to zendesk-demo" in o for o in said.values())
        status = next(o for c, o in reversed(list(said.items())) if "onboard status" in c)
        # The example profile names an environment: connected, then activated on it.
        assert re.search(r"activated\s*│\s*1\s*│", status), status
        assert re.search(r"connected 1 \(\d+%\) → activated 1 \(\d+%\)", status), status
        assert any("Revoked 1 connect link(s) of tenant t002" in o for o in said.values())
        t002 = link_in(newest_email(tmp_path / "smtp-sink", "t002"), connect)
        assert httpx.get(t002, timeout=10).status_code == 404
        made = httpx.get(f"{emulator_url}/_emulator/connections", timeout=10).json()
        assert [c["external_id"] for c in made["connections"]] == ["t001"]
        exported_rows = subprocess.run(
            [str(VENV_BIN / "onboard"), "export", "--format", "csv", "--connector", CONNECT_SYSTEM],
            env=reader.shells["3"].env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        row = next(line for line in exported_rows.splitlines() if line.startswith("t001,"))
        assert ",activated," in row and made["connections"][0]["id"] in row
    log = reader.background["connect-server"].read_text()
    assert "Traceback" not in log, log
    print(f"The docs' sections ran in {time.monotonic() - started:.1f} s")
