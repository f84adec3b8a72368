# I3: io_setup with a huge nr_events takes the host's whole fs.aio-max-nr pool.
import ctypes, errno

libc = ctypes.CDLL(None, use_errno=True)
SYS_io_setup = 206
ctx = ctypes.c_ulong(0)
before = int(open("/proc/sys/fs/aio-nr").read())
r = libc.syscall(SYS_io_setup, 65536, ctypes.byref(ctx))
e = ctypes.get_errno()
after = int(open("/proc/sys/fs/aio-nr").read())
print("io_setup", r, errno.errorcode.get(e, e) if r != 0 else "ok")
print("aio-nr grew", after - before)
