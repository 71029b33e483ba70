"""Hospital networks on loopback: an outbound HTTP(S) proxy and a link that can be cut.

:class:`ConnectProxy` is the smallest proxy a hospital firewall may impose: it only tunnels
``CONNECT host:port`` requests and records each tunnel it opened. :class:`TcpRelay` forwards a
local port to the coordinator; :meth:`TcpRelay.cut` drops every open connection and refuses new
ones until :meth:`TcpRelay.restore`, as a failed link between a site and its coordinator would.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes from ``source`` to ``sink`` until either side closes."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Listener:
    """A loopback TCP server that hands each accepted connection to ``handle`` in a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._handle = handle
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.update(socks)

    def drop_all(self) -> None:
        """Close every connection this listener is carrying."""
        with self._lock:
            socks, self._open = self._open, set()
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.server.close()
        self.drop_all()


class ConnectProxy(_Listener):
    """An HTTP proxy on ``127.0.0.1:port`` that only tunnels ``CONNECT`` (HTTPS) requests;
    ``tunnels`` lists the ``host:port`` of each tunnel it opened."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        super().__init__(self._serve)

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            head += chunk
        request = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(request) != 3 or request[0] != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        host, port = request[1].rsplit(":", 1)
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        upstream.settimeout(None)
        self.tunnels.append(request[1])
        self.track(client, upstream)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            upstream.sendall(rest)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class TcpRelay(_Listener):
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port``, unless cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connected = threading.Event()
        self.connected.set()
        self.connections = 0
        super().__init__(self._serve)

    def _serve(self, client: socket.socket) -> None:
        if not self.connected.is_set():
            client.close()  # the link is down: refused
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self.connections += 1
        self.track(client, upstream)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        self.connected.clear()
        self.drop_all()

    def restore(self) -> None:
        self.connected.set()
