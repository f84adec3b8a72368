# I3: shared read-only host files. Holds an exclusive flock on /usr/bin/env and watches /usr/bin
# with inotify, then reports how many events arrived while the host (the test) opened and read
# files there. Neither the lock nor the events may cross the sandbox's boundary.
import ctypes, fcntl, os, select, sys, time

libc = ctypes.CDLL(None, use_errno=True)
IN_ACCESS, IN_OPEN, IN_CLOSE_NOWRITE = 0x1, 0x20, 0x10
lock = open("/usr/bin/env", "rb")
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
fd = libc.inotify_init1(os.O_NONBLOCK)
if fd < 0 or libc.inotify_add_watch(fd, b"/usr/bin", IN_ACCESS | IN_OPEN | IN_CLOSE_NOWRITE) < 0:
    print("inotify failed", ctypes.get_errno(), flush=True)
    sys.exit(1)
print("ready", flush=True)
events = 0
deadline = time.monotonic() + float(sys.argv[1] if len(sys.argv) > 1 else 3)
while time.monotonic() < deadline:
    r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    if r:
        try:
            events += len(os.read(fd, 65536))
        except BlockingIOError:
            pass
print("event bytes", events, flush=True)
