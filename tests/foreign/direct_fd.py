#!/usr/bin/python3
"""A direct subscription's fd passed between users, with GDBus, for tests/direct.rs.

    direct_fd.py open --address ADDR --send SOCKET
        SubscribeDirect on the bus, sends the path and the fd to the unix socket SOCKET
        (SCM_RIGHTS), prints "sent PATH", then keeps its bus connection until stdin ends
        (a direct subscription ends when its opener leaves the bus).
    direct_fd.py hold --listen SOCKET KIND...
        Listens on SOCKET, prints "listening", takes one path and fd, and on that fd tries
        AddWatch(KIND, tag, {}) for each KIND, printing "KIND ok" or "KIND ERROR-NAME".
    direct_fd.py own --address ADDR KIND...
        The same AddWatch attempts on a direct subscription of its own.
"""

import argparse
import os
import socket
import sys

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402


def bus_connection(address):
    flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
             | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
    return Gio.DBusConnection.new_for_address_sync(address, flags, None, None)


def subscribe_direct(bus):
    reply, fds = bus.call_with_unix_fd_list_sync(
        "org.watchq1", "/org/watchq1", "org.watchq1.Manager", "SubscribeDirect",
        GLib.Variant("(a{sv})", ({},)), GLib.VariantType("(oh)"),
        Gio.DBusCallFlags.NONE, -1, None, None)
    path, index = reply.unpack()
    return path, fds.get(index)


def try_watches(path, fd, kinds):
    sock = Gio.Socket.new_from_fd(fd)
    conn = Gio.DBusConnection.new_sync(sock.connection_factory_create_connection(), None,
                                       Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT,
                                       None, None)
    for tag, kind in enumerate(kinds, start=1):
        try:
            conn.call_sync(None, path, "org.watchq1.Subscription", "AddWatch",
                           GLib.Variant("(sta{sv})", (kind, tag, {})), None,
                           Gio.DBusCallFlags.NONE, -1, None)
            print(f"{kind} ok", flush=True)
        except GLib.Error as e:
            print(f"{kind} {Gio.DBusError.get_remote_error(e)}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["open", "hold", "own"])
    parser.add_argument("--address")
    parser.add_argument("--send")
    parser.add_argument("--listen")
    parser.add_argument("kinds", nargs="*")
    args = parser.parse_intermixed_args()
    if args.mode == "open":
        bus = bus_connection(args.address)
        path, fd = subscribe_direct(bus)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(args.send)
            socket.send_fds(s, [path.encode()], [fd])
        os.close(fd)
        print(f"sent {path}", flush=True)
        sys.stdin.read()
    elif args.mode == "hold":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(args.listen)
            os.chmod(args.listen, 0o777)
            s.listen(1)
            print("listening", flush=True)
            conn, _ = s.accept()
            data, fds, _, _ = socket.recv_fds(conn, 1024, 1)
            conn.close()
        try_watches(data.decode(), fds[0], args.kinds)
    else:
        bus = bus_connection(args.address)
        path, fd = subscribe_direct(bus)
        try_watches(path, fd, args.kinds)


if __name__ == "__main__":
    main()
