"""Whether a web service can be reached, found out in seconds and the way its client will connect.

The AI Hub client (requests) and the Hugging Face client (httpx) retry an unreachable host for tens of
seconds; one probe here tells a stage at once that it is offline, and why.
"""

from __future__ import annotations

import base64
import socket
import threading
import urllib.request
from urllib.parse import unquote, urlparse

__all__ = ["unreachable_reason", "proxy_for"]


def proxy_for(url: str) -> str | None:
    """The proxy `requests` would use for `url` (HTTPS_PROXY / ALL_PROXY, minus NO_PROXY), or None;
    httpx, Hugging Face's client, reads the same variables."""
    try:
        from requests.utils import get_environ_proxies, select_proxy
    except ImportError:  # an install without the hub extra: the standard library reads the same variables
        parsed = urlparse(url)
        if urllib.request.proxy_bypass(parsed.hostname or ""):
            return None
        proxies = urllib.request.getproxies()
        proxy = proxies.get(parsed.scheme) or proxies.get("all")
    else:
        proxy = select_proxy(url, get_environ_proxies(url))
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy  # what requests assumes for a bare host:port
    return proxy


def _redacted(proxy: str) -> str:
    parsed = urlparse(proxy)
    return f"{parsed.scheme}://{parsed.hostname}:{parsed.port}" if parsed.hostname else proxy


def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or url, parsed.port or (80 if parsed.scheme == "http" else 443)


def _tunnel(connection: socket.socket, proxy: str, host: str, port: int) -> None:
    """Ask an HTTP proxy for a tunnel to host:port, as requests does for https; raise on refusal."""
    parsed = urlparse(proxy)
    lines = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"]
    if parsed.username:
        token = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}".encode()
        lines.append("Proxy-Authorization: Basic " + base64.b64encode(token).decode())
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = connection.recv(1024).decode("latin-1").split("\r\n", 1)[0]
    parts = answer.split()
    if len(parts) < 2 or parts[1] != "200":
        raise ConnectionRefusedError(f"the proxy answered {answer!r} to CONNECT {host}:{port}"
                                     + (" (proxy authentication required)" if parts[1:2] == ["407"] else ""))


def unreachable_reason(url: str, timeout_s: float) -> str | None:
    """None when the host of `url` answers within timeout_s, through the proxy requests would use, DNS
    included; else where it was tried and why it failed, e.g. "huggingface.co:443 (no answer within 5s)".

    Directly: open (and close) a TCP connection. Through an HTTP proxy: connect to it and ask for a
    CONNECT tunnel to the host. Runs in a daemon thread because getaddrinfo ignores socket timeouts;
    a hung lookup therefore costs timeout_s, not minutes."""
    host, port = _host_port(url)
    proxy = proxy_for(url)
    outcome: dict[str, BaseException | None] = {}

    def connect():
        try:
            target = _host_port(proxy) if proxy else (host, port)
            with socket.create_connection(target, timeout=timeout_s) as connection:
                if proxy and urlparse(proxy).scheme == "http":
                    _tunnel(connection, proxy, host, port)
            outcome["error"] = None
        except OSError as err:
            outcome["error"] = err

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        reason = f"no answer within {timeout_s:g}s"
    elif outcome["error"] is not None:
        reason = f"{type(outcome['error']).__name__}: {outcome['error']}"
    else:
        return None
    via = f" through the proxy {_redacted(proxy)} (from HTTPS_PROXY/ALL_PROXY; NO_PROXY bypasses it)" if proxy else ""
    return f"{host}:{port}{via} ({reason})"
