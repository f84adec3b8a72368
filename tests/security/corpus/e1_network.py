# Attack: reach the network with the default "none" policy: a public host, the cloud metadata
# service (in several encodings), IPv6, and DNS. Every attempt must fail.
import socket

targets = [
    ("1.1.1.1", 80), ("169.254.169.254", 80), ("2852039166", 80), ("0xa9fea9fe", 80),
    ("10.0.0.1", 80), ("192.168.0.1", 80), ("8.8.8.8", 53),
]
reached = []
for host, port in targets:
    try:
        socket.create_connection((host, port), timeout=2).close()
        print(f"{host}:{port}: CONNECTED")
        reached.append(host)
    except OSError as e:
        print(f"{host}:{port}: failed ({e.__class__.__name__})")
for host in ["2606:4700:4700::1111", "::ffff:169.254.169.254"]:
    try:
        socket.create_connection((host, 80), timeout=2).close()
        reached.append(host)
        print(f"[{host}]: CONNECTED")
    except OSError as e:
        print(f"[{host}]: failed ({e.__class__.__name__})")
try:
    socket.getaddrinfo("example.com", 80)
    print("dns: RESOLVED")
    reached.append("dns")
except OSError as e:
    print(f"dns: failed ({e.__class__.__name__})")
print("interfaces:", sorted(name for _, name in socket.if_nameindex()))
print("summary:", "ESCAPED " + ",".join(reached) if reached else "contained")
