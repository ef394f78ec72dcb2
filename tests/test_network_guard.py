import socket

import pytest


def test_network_connection_is_refused():
    with pytest.raises(RuntimeError, match="network connection"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
