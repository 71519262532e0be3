"""lpcv_depth/network.py: the reachability probe the AI Hub preflight and the Hugging Face download share."""

from __future__ import annotations

import socket
import sys

import pytest

from lpcv_depth.network import proxy_for, unreachable_reason


@pytest.mark.parametrize("requests_installed", [True, False])
def test_the_proxy_is_the_one_the_environment_names(monkeypatch, requests_installed):
    if not requests_installed:  # an install without the hub extra reads the variables through urllib
        monkeypatch.setitem(sys.modules, "requests.utils", None)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("https://huggingface.co") is None
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example:3128")
    assert proxy_for("https://huggingface.co") == "http://proxy.example:3128"
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert proxy_for("https://huggingface.co") is None
    assert proxy_for("https://workbench.aihub.qualcomm.com") == "http://proxy.example:3128"


def test_a_listening_host_is_reachable_and_a_closed_port_says_why(monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert unreachable_reason(f"http://127.0.0.1:{port}", 5) is None
    reason = unreachable_reason(f"http://127.0.0.1:{port}", 5)
    assert reason.startswith(f"127.0.0.1:{port} (ConnectionRefusedError")
