"""Loaded by every Python process of the offline bundle tests (PYTHONPATH): records each attempt to
reach the network (a name lookup, or a connect/send on a socket that is not a Unix socket) in the
file named by EDGELORA_NETLOG. The tests run in a network namespace, so such an attempt fails
anyway; the log makes the attempt itself fail the test, whatever the program does with the error."""

import os
import socket
import sys

_LOG = os.environ.get("EDGELORA_NETLOG")
_EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.connect",
           "socket.sendto", "socket.sendmsg"}  # not bind: urllib3 binds ::1 to test for IPv6


def _hook(event, args):
    if event not in _EVENTS:
        return
    sock = args[0] if args and isinstance(args[0], socket.socket) else None
    if sock is not None and sock.family == getattr(socket, "AF_UNIX", None):
        return
    try:
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {' '.join(sys.argv)[:200]}: {event} {args[1:] if sock else args}\n")
    except Exception:
        pass


if _LOG:
    sys.addaudithook(_hook)
