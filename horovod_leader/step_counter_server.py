"""A tiny fetch-and-add server: the global step count of asynchronous runs across nodes.

On one node, the asynchronous schedule keeps its two counters in an MPI window in shared
memory (``MPI_Fetch_and_op``: 0.03-0.05 ms, no other rank involved). Across nodes, Open MPI
4.1's one-sided components either refuse the window (``sm`` is single-node, ``pt2pt`` refuses
the thread level Horovod needs, ``rdma`` finds no transport over TCP) or, with ``ucx``, make
every update wait until rank 0 enters MPI (97-148 ms per step with Horovod running, measured
on the emulated cluster). A thread on rank 0 would compete with its training for the
interpreter lock. So rank 0 starts this server as a separate process: it serves every rank
over TCP, whatever rank 0 is doing.

Protocol, per persistent connection: the client sends 9 bytes, an operation (``b"+"`` add
to the total, ``b"c"`` add to the closed count; the value may be 0, to read) and a signed
64-bit little-endian value; the server answers with the counter's new value in 8 bytes. The
server ends when its standard input closes (rank 0 has finished or died).

    python -m horovod_leader.step_counter_server     # prints "PORT <n>" once listening
"""
from __future__ import annotations

import selectors
import socket
import struct
import sys

REQUEST = struct.Struct("<cq")
REPLY = struct.Struct("<q")


def serve(listener: socket.socket, control) -> None:
    counters = {b"+": 0, b"c": 0}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(control, selectors.EVENT_READ, "control")
    pending = {}
    while True:
        for key, _ in selector.select():
            if key.data == "control":
                if not control.read(1):
                    return
            elif key.data == "accept":
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setblocking(False)
                pending[conn] = b""
                selector.register(conn, selectors.EVENT_READ, "client")
            else:
                conn = key.fileobj
                try:
                    data = conn.recv(4096)
                except ConnectionError:
                    data = b""
                if not data:
                    selector.unregister(conn)
                    conn.close()
                    pending.pop(conn, None)
                    continue
                buffer = pending[conn] + data
                replies = []
                while len(buffer) >= REQUEST.size:
                    op, value = REQUEST.unpack_from(buffer)
                    buffer = buffer[REQUEST.size:]
                    counters[op] += value
                    replies.append(REPLY.pack(counters[op]))
                pending[conn] = buffer
                conn.setblocking(True)
                conn.sendall(b"".join(replies))
                conn.setblocking(False)


def main() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(256)
    sys.stdout.write(f"PORT {listener.getsockname()[1]}\n")
    sys.stdout.flush()
    serve(listener, sys.stdin.buffer)


if __name__ == "__main__":
    main()
