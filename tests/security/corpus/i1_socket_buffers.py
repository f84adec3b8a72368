# I1: loopback TCP pairs whose receivers never read, each sender writing until its buffers are
# full. Without a per-sandbox bound the kernel queues gigabytes in the host's shared tcp_mem.
import socket

PAIRS = 300
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1024)
port = srv.getsockname()[1]
pairs = []
queued = 0
chunk = b"x" * 65536
for i in range(PAIRS):
    try:
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)
        c.connect(("127.0.0.1", port))
        s, _ = srv.accept()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 30)
        c.setblocking(False)
        while True:
            try:
                queued += c.send(chunk)
            except (BlockingIOError, OSError):
                break
        pairs.append((c, s))
    except OSError as e:
        print("stopped at pair", i, e)
        break
print("pairs", len(pairs))
print("queued MiB", queued >> 20)
