# Attack: reach host-kernel attack surface from inside the sandbox (CVE-2022-0185 fsconfig via a
# user namespace, CVE-2024-1086 nf_tables, io_uring, bpf, keyctl, perf, userfaultfd, kexec,
# module loading, open_by_handle_at "shocker", ptrace of the agent, TIOCSTI injection). Every
# call must fail; the script prints one line per call and a summary. A call can fail in the
# kernel for its arguments alone (key id 0, a program of type 0, fd 0 as a namespace), so the
# last line says which failed with something other than EPERM, the filter's answer: those
# reached the kernel's code.
import ctypes
import errno
import os
import socket

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

NR = {
    "keyctl": 250, "add_key": 248, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "io_uring_setup": 425, "kexec_load": 246, "init_module": 175, "finit_module": 313,
    "open_by_handle_at": 304, "ptrace": 101, "process_vm_readv": 310, "unshare": 272,
    "mount": 165, "setns": 308, "fsopen": 430, "pivot_root": 155, "swapon": 167,
    "reboot": 169, "personality": 135, "name_to_handle_at": 303, "syslog": 103,
}
buf = ctypes.create_string_buffer(256)
calls = {
    "keyctl": (0, 0, 0, 0, 0),
    "add_key": (ctypes.c_char_p(b"user"), ctypes.c_char_p(b"x"), buf, 1, -3),
    "bpf": (5, buf, 48),
    "perf_event_open": (buf, 0, -1, -1, 0),
    "userfaultfd": (0,),
    "io_uring_setup": (8, buf),
    "kexec_load": (0, 0, 0, 0),
    "init_module": (buf, 16, ctypes.c_char_p(b"")),
    "finit_module": (0, ctypes.c_char_p(b""), 0),
    "open_by_handle_at": (3, buf, 0),
    "ptrace": (16, 1, 0, 0),  # PTRACE_ATTACH to the agent
    "process_vm_readv": (1, buf, 1, buf, 1, 0),
    "unshare": (0x10000000,),  # CLONE_NEWUSER
    "mount": (ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/tmp"), ctypes.c_char_p(b"tmpfs"), 0, 0),
    "setns": (0, 0),
    "fsopen": (ctypes.c_char_p(b"tmpfs"), 0),
    "pivot_root": (ctypes.c_char_p(b"/tmp"), ctypes.c_char_p(b"/tmp")),
    "swapon": (ctypes.c_char_p(b"/tmp/x"), 0),
    "reboot": (0xfee1dead, 672274793, 0x4321fedc, 0),
    "personality": (0x0400000,),  # READ_IMPLIES_EXEC
    "name_to_handle_at": (-100, ctypes.c_char_p(b"/"), buf, buf, 0),
    "syslog": (3, buf, 16),
}
escaped = []
not_eperm = []
for name, args in calls.items():
    r = libc.syscall(NR[name], *args)
    e = ctypes.get_errno()
    ok = r < 0
    print(f"{name}: {'denied ' + errno.errorcode.get(e, str(e)) if ok else 'ALLOWED ' + str(r)}")
    if not ok:
        escaped.append(name)
    elif e != errno.EPERM:
        not_eperm.append(f"{name}={errno.errorcode.get(e, e)}")

# nf_tables lives behind NETLINK_NETFILTER (12).
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    print("netlink_netfilter: ALLOWED")
    escaped.append("netlink_netfilter")
except OSError as e:
    print(f"netlink_netfilter: denied {errno.errorcode.get(e.errno, e.errno)}")
    if e.errno != errno.EPERM:
        not_eperm.append(f"netlink_netfilter={errno.errorcode.get(e.errno, e.errno)}")
for fam, name in [(socket.AF_PACKET, "af_packet"), (40, "af_vsock")]:
    try:
        socket.socket(fam, socket.SOCK_RAW if fam == socket.AF_PACKET else socket.SOCK_STREAM, 0)
        print(f"{name}: ALLOWED")
        escaped.append(name)
    except OSError as e:
        print(f"{name}: denied {errno.errorcode.get(e.errno, e.errno)}")
        if e.errno != errno.EPERM:
            not_eperm.append(f"{name}={errno.errorcode.get(e.errno, e.errno)}")

# Terminal injection: TIOCSTI on our own terminal or stdin.
import fcntl
import termios
try:
    fcntl.ioctl(0, termios.TIOCSTI, b"x")
    print("tiocsti: ALLOWED")
    escaped.append("tiocsti")
except OSError as e:
    print(f"tiocsti: denied {errno.errorcode.get(e.errno, e.errno)}")
    if e.errno != errno.EPERM:
        not_eperm.append(f"tiocsti={errno.errorcode.get(e.errno, e.errno)}")

print("summary:", "ESCAPED " + ",".join(escaped) if escaped else "contained")
print("errnos:", "OTHER " + ",".join(not_eperm) if not_eperm else "all EPERM")
