"""`onboard connect-server` refuses to serve links over plain http where they could cross a
network, and refuses bad settings before any worker starts (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from connect_service.http_server import check_serving
from onboarding.errors import InputError
from onboarding.settings import ConnectSettings

ONBOARD = str(Path(sys.executable).parent / "onboard")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "connect.example.com", "::"])
def test_a_non_loopback_host_needs_a_tls_proxy(host: str) -> None:
    with pytest.raises(InputError, match="--forwarded-allow-ips"):
        check_serving(host, None)
    check_serving(host, "10.0.0.5")  # behind a named proxy: allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_is_served_as_is(host: str) -> None:
    check_serving(host, None)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://connect.example.com", "plain http"),
        ("ftp://connect.example.com", "https URL"),
        ("https://connect.example.com/?a=1", "no query"),
        ("https://user:pw@connect.example.com", "user info"),
    ],
)
def test_the_base_url_must_be_https(url: str, why: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", url)
    with pytest.raises(InputError, match="ONBOARD_CONNECT_BASE_URL") as caught:
        ConnectSettings()
    assert why in str(caught.value)
    assert "pw" not in str(caught.value)


def test_the_base_url_on_loopback_may_be_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", "http://127.0.0.1:8800/")
    assert ConnectSettings().base_url == "http://127.0.0.1:8800"


def test_the_command_exits_2_before_serving(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [ONBOARD, "connect-server", "--host", "0.0.0.0"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "--forwarded-allow-ips" in done.stderr
    env["ONBOARD_DB_URL"] = f"sqlite:///{tmp_path / 'l.db'}"
    done = subprocess.run(
        [ONBOARD, "connect-server", "--port", "1"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "VERSORI_API_KEY" in done.stderr


def test_the_workers_shared_listener_is_tcp_so_answers_are_not_held_back() -> None:
    """With --workers N > 1 the workers accept on TcpConfig's listener: each accepted
    connection gets TCP_NODELAY from asyncio, so an answer's body is not held ~40 ms for the
    client's delayed ACK (uvicorn's own listener has protocol 0: asyncio skips it)."""
    import asyncio
    import socket

    from connect_service.listener import TcpConfig

    config = TcpConfig("connect_service.app:app_from_env", host="127.0.0.1", port=0)
    listener = config.bind_socket()
    assert listener.proto == socket.IPPROTO_TCP
    listener.listen()
    seen: list[int] = []

    async def accept_one() -> None:
        class Note(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Note, sock=listener)
        host, port = listener.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(accept_one())
    assert seen == [1], "the accepted connection has TCP_NODELAY on"
