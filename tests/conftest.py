"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one thread, because tiny models run slower when several threads share a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def loopback_port():
    """Return a free port on 127.0.0.1 for a multi-process run, or skip the test where loopback is down.

    The processes of a gloo run meet on 127.0.0.1. In a fresh network
    namespace (`unshare -n`) the loopback interface is down, and the launcher
    would wait out its whole timeout instead.
    """
    import socket

    with socket.socket() as server:
        try:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=5):
                pass
        except OSError as error:
            pytest.skip(f"no connection to 127.0.0.1 ({error}); bring the loopback interface up (ip link set lo up)")
        return server.getsockname()[1]
