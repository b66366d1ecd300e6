#!/usr/bin/env python3
"""Memory per idle keep-alive connection: sends one GET on each of N new connections to 127.0.0.1:PORT, keeps
them open, and prints the RSS growth of process PID (the gateway). Loopback only; exits (closing them) when done.
Usage: benches/idle_conns.py PORT PID [N=2000] [PATH=/users/me]   (raise `ulimit -n` above N first)
Outside this repository it reads /proc/PID/status of the gateway process; it does not need ../shared/bench."""
import socket, sys, time

port, pid = int(sys.argv[1]), int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
path = sys.argv[4] if len(sys.argv) > 4 else "/users/me"
req = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))


def get(s):
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("connection closed by the gateway")
        data += chunk


warm = socket.create_connection(("127.0.0.1", port))
get(warm)
time.sleep(0.3)
base = rss_kib()
# Spread over source addresses 127.0.0.1-8: one client may hold only `max_connections_per_client` (1000).
conns = [socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{1 + i % 8}", 0)) for i in range(n)]
for s in conns:
    get(s)
time.sleep(0.5)
grown = rss_kib() - base
print(f"idle RSS {base} KiB; {n} idle keep-alive connections: +{grown} KiB = {grown * 1024 / n:.0f} bytes each")
