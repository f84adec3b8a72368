# Attack: with the internet open (`--net internet`), reach what must stay closed: the cloud
# metadata service in several encodings, private, shared and link-local ranges, IPv6 unique
# local and link-local addresses, and the host's own addresses (HOST_ADDRS, a comma-separated
# list the test passes). A connection moat refuses is reset at once; one it allows would hang
# (moat tries the address) or answer. Every target must be reset.
import os
import socket
import time

targets = [
    "169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376",
    "::ffff:169.254.169.254", "169.254.170.2", "100.100.100.200", "10.0.0.1",
    "172.16.0.1", "192.168.0.1", "100.64.0.1", "192.0.0.1", "fd00:ec2::254", "fc00::1",
    "0.0.0.0", "224.0.0.1",
] + [a for a in os.environ.get("HOST_ADDRS", "").split(",") if a]
escaped = []
for host in targets:
    began = time.monotonic()
    try:
        s = socket.create_connection((host, 80), timeout=3)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = s.recv(100)
        took = time.monotonic() - began
        verdict = "answered" if data else ("closed" if took < 1 else "slow close")
    except socket.timeout:
        verdict = "hung"
    except OSError as e:
        verdict = f"refused ({e.__class__.__name__})"
    print(f"{host}: {verdict}")
    if verdict in ("answered", "hung", "slow close"):
        escaped.append(host)
print("summary:", "ESCAPED " + ",".join(escaped) if escaped else "contained")
