"""An HTTP server with a fixed pool of worker threads, a bounded wait line and a real backlog.

``http.server.ThreadingHTTPServer`` starts one thread per connection with no cap and listens
with a backlog of 5: under a burst the kernel's accept queue overflows and clients get
connection resets. Here the listen backlog is large, the accept loop only hands sockets on,
``workers`` threads serve connections, at most ``max_pending`` more wait for a worker, and any
connection beyond that is answered by a small rejecter pool with ``503`` and ``Retry-After``.
The rejecter reads the request (headers and a bounded body) before answering, because closing a
socket with unread bytes makes the kernel send a reset instead of the answer.
"""

from __future__ import annotations

import queue
import socket
import threading
from http.server import HTTPServer


class PooledHTTPServer(HTTPServer):
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler,
        busy_handler,
        *,
        workers: int = 16,
        max_pending: int = 32,
        backlog: int = 1024,
        rejecters: int = 2,
    ):
        self.request_queue_size = backlog  # listen(backlog); the kernel caps it at somaxconn
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.busy_handler = busy_handler
        self.pending: queue.Queue = queue.Queue(maxsize=max(0, max_pending) or 1)
        self.rejects: queue.Queue = queue.Queue(maxsize=max(backlog, 1))
        self.active = 0  # connections a worker is serving now
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(self.pending, handler), daemon=True,
                             name=f"lmtrain-http-{i}")
            for i in range(max(1, workers))
        ] + [
            threading.Thread(target=self._work, args=(self.rejects, busy_handler), daemon=True,
                             name=f"lmtrain-http-busy-{i}")
            for i in range(max(1, rejecters))
        ]  # fmt: skip
        for t in self._threads:
            t.start()

    def process_request(self, request, client_address) -> None:
        """Called by the accept loop: hand the socket on, never block."""
        try:
            self.pending.put_nowait((request, client_address))
            return
        except queue.Full:
            pass
        try:
            self.rejects.put_nowait((request, client_address))
        except queue.Full:  # beyond even the rejecters' line: nothing left but to drop it
            self.shutdown_request(request)

    def busy(self) -> bool:
        """Whether connections are waiting for a worker (handlers then close kept-alive ones)."""
        return not self.pending.empty()

    def _work(self, line: queue.Queue, handler) -> None:
        while True:
            item = line.get()
            if item is None:
                return
            request, address = item
            if handler is not self.busy_handler:
                with self._lock:
                    self.active += 1
            try:
                handler(request, address, self)
            except Exception:  # noqa: BLE001 - one connection's failure must not kill a worker
                self.handle_error(request, address)
            finally:
                if handler is not self.busy_handler:
                    with self._lock:
                        self.active -= 1
                self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        for line in (self.pending, self.rejects):
            while True:
                try:
                    item = line.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self.shutdown_request(item[0])
        for t in self._threads:
            (self.rejects if "busy" in t.name else self.pending).put(None)
