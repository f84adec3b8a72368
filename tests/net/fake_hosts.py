"""The hosts of the fake internet the network tests build: run inside a network namespace the
test made, bound to addresses routed only into it.

- HTTP on port 80 and 8080, HTTPS on 443 of every address of the namespace, IPv4 and IPv6 (a self-signed certificate for web.test,
  *.web.test and other.test): each answers `<scheme> <port> host=<Host> sni=<SNI>`.
- A UDP echo on port 7 of every address, which answers what it is sent.
- DNS over UDP and TCP on DNS:53, answering the names of --names (a JSON object of name to a
  list of answers; each answer is a list of addresses; successive queries of one type for a
  name get successive answers, the last one repeating) with --ttl; any other name is NXDOMAIN.

It writes --ready once every socket listens, and runs until killed.
"""

import argparse
import ipaddress
import json
import os
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--dns", required=True)
    p.add_argument("--names", default="{}")
    p.add_argument("--ttl", type=int, default=60)
    p.add_argument("--dir", required=True, help="where the certificate is written")
    p.add_argument("--ready", required=True)
    return p.parse_args()


def make_certificate(directory):
    cert = os.path.join(directory, "web.pem")
    key = os.path.join(directory, "web.key")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=web.test", "-keyout", key, "-out", cert,
            "-addext", "subjectAltName=DNS:web.test,DNS:*.web.test,DNS:other.test",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class Handler(BaseHTTPRequestHandler):
    scheme = "http"
    # Keep-alive, as real servers: a second request on a connection is served unless the first
    # said `Connection: close`.
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        sni = getattr(self.connection, "moat_sni", None) or "-"
        port = self.connection.getsockname()[1]
        body = f"{self.scheme} {port} host={self.headers.get('Host', '-')} sni={sni}\n"
        data = body.encode()
        if self.path.startswith("/bytes/"):
            # /bytes/N: N bytes of payload, for throughput.
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = b"x" * 65536
            while n > 0:
                self.wfile.write(chunk[: min(n, len(chunk))])
                n -= min(n, len(chunk))
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class TlsHandler(Handler):
    scheme = "https"


class DualStackServer(ThreadingHTTPServer):
    """Listens on IPv6 and IPv4 alike."""

    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve_http(port, handler, context=None):
    server = DualStackServer(("::", port), handler)
    server.daemon_threads = True
    if context is not None:
        def on_sni(sock, name, _ctx):
            sock.moat_sni = name

        context.sni_callback = on_sni
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def serve_udp_echo(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 7))

    def run():
        while True:
            data, peer = s.recvfrom(2048)
            s.sendto(data, peer)

    threading.Thread(target=run, daemon=True).start()


class Names:
    def __init__(self, table, ttl):
        self.table = {k.lower().rstrip("."): v for k, v in table.items()}
        self.asked = {}
        self.ttl = ttl
        self.lock = threading.Lock()

    def answer(self, name, qtype):
        with self.lock:
            answers = self.table.get(name)
            if answers is None:
                return None
            n = self.asked.get((name, qtype), 0)
            self.asked[(name, qtype)] = n + 1
            return answers[min(n, len(answers) - 1)]


def read_name(msg, at):
    labels = []
    while True:
        n = msg[at]
        if n == 0:
            return ".".join(labels), at + 1
        labels.append(msg[at + 1 : at + 1 + n].decode("ascii", "replace"))
        at += 1 + n


def encode_name(name):
    return b"".join(bytes([len(l)]) + l.encode() for l in name.split(".") if l) + b"\x00"


def respond(query, names):
    if len(query) < 12:
        return None
    qid, flags = struct.unpack("!HH", query[:4])
    name, at = read_name(query, 12)
    qtype, _qclass = struct.unpack("!HH", query[at : at + 4])
    question = query[12 : at + 4]
    addrs = names.answer(name.lower(), qtype)
    records = b""
    count = 0
    rcode = 0
    if addrs is None:
        rcode = 3
    else:
        for a in addrs:
            if a.startswith("alias-ptr "):
                # An alias to a reverse-lookup name, and that name's PTR record: what a
                # resolver that follows the alias answers.
                _, reverse, target = a.split()
                rdata = encode_name(reverse)
                records += b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, names.ttl, len(rdata)) + rdata
                rdata = encode_name(target)
                records += encode_name(reverse) + struct.pack("!HHIH", 12, 1, names.ttl, len(rdata)) + rdata
                count += 2
                continue
            ip = ipaddress.ip_address(a)
            rtype = 1 if ip.version == 4 else 28
            if rtype != qtype:
                continue
            records += b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, names.ttl, len(ip.packed)) + ip.packed
            count += 1
    header = struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x0100) | 0x0080 | rcode, 1, count, 0, 0)
    return header + question + records


def serve_dns(addr, names):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((addr, 53))

    def udp():
        while True:
            q, peer = u.recvfrom(4096)
            try:
                r = respond(q, names)
            except Exception:
                r = None
            if r is not None:
                u.sendto(r, peer)

    class Tcp(socketserver.BaseRequestHandler):
        def handle(self):
            head = self.request.recv(2)
            if len(head) < 2:
                return
            (n,) = struct.unpack("!H", head)
            q = b""
            while len(q) < n:
                chunk = self.request.recv(n - len(q))
                if not chunk:
                    return
                q += chunk
            r = respond(q, names)
            if r is not None:
                self.request.sendall(struct.pack("!H", len(r)) + r)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    t = socketserver.ThreadingTCPServer((addr, 53), Tcp)
    t.daemon_threads = True
    threading.Thread(target=udp, daemon=True).start()
    threading.Thread(target=t.serve_forever, daemon=True).start()


def main():
    args = parse_args()
    cert, key = make_certificate(args.dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    serve_http(80, Handler)
    serve_http(8080, Handler)
    serve_http(443, TlsHandler, context)
    serve_udp_echo("0.0.0.0")
    serve_dns(args.dns, Names(json.loads(args.names), args.ttl))
    with open(args.ready, "w") as f:
        f.write("ready\n")
    threading.Event().wait()


if __name__ == "__main__":
    main()
