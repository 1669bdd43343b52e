#!/usr/bin/python3
"""Many watchqd subscriptions in one process, with a D-Bus library we did not write,
joining, stalling, dying and leaving at random: the soak's workers (benches/soak.rs).

    soak_worker.py --address ADDR --library jeepney|gdbus [--ping ignore|unknown-method]
                   --connections N --per-connection K --device NAME --marker NAME --seed S

Every subscription watches DEVICE (tag 1) and MARKER (tag 2), with a queue depth drawn
from a few (small ones overflow, so Lost is exercised). jeepney connections are churned
here: stalled (not read for 1-4 s), killed (socket closed without a word) or left
(Close, then disconnect), each replaced by a fresh one. GDBus connections are churned
from outside: the driver stops and kills whole GDBus workers.

On a line "report" on stdin, churning stops, every connection is read again, and once
every live subscription has seen a MARKER event (the driver keeps making them) the
worker prints one line per subscription, "sub PATH EVENTS LOST NEXT_SEQ ok|gap@SEQ",
then "done", and keeps serving until its stdin closes.
"""

import argparse
import os
import random
import select
import sys
import time

DEPTHS = [8, 64, 1024]


class Account:
    """One subscription's signals, checked for contiguous sequence numbers."""

    def __init__(self, path):
        self.path = path
        self.events = 0
        self.lost = 0
        self.expected = 1
        self.gap = None
        self.marked = False

    def signal(self, member, body):
        seq = body[0]
        if seq != self.expected and self.gap is None:
            self.gap = seq
        if member == "Lost":
            self.lost += body[1]
            self.expected = seq + max(body[1], 1)
        else:
            self.expected = seq + 1
            if member == "DeviceChanged":
                self.events += 1
                if body[1] == 2:
                    self.marked = True

    def line(self):
        verdict = "ok" if self.gap is None else f"gap@{self.gap}"
        return f"sub {self.path} {self.events} {self.lost} {self.expected} {verdict}"


def stdin_line():
    readable, _, _ = select.select([sys.stdin], [], [], 0)
    return sys.stdin.readline().strip() if readable else None


# ---------------------------------------------------------------- jeepney

class JeepneyConnection:
    def __init__(self, args, rng):
        from jeepney import DBusAddress, new_method_call
        from jeepney.bus_messages import message_bus
        from jeepney.io.blocking import open_dbus_connection

        self.args = args
        self.conn = open_dbus_connection(bus=args.address)
        self.owner = self.conn.send_and_get_reply(message_bus.GetNameOwner("org.watchq1")).body[0]
        self.accounts = {}
        self.stalled_until = 0.0
        manager = DBusAddress("/org/watchq1", "org.watchq1", "org.watchq1.Manager")
        for _ in range(args.per_connection):
            options = {"queue-depth": ("u", rng.choice(DEPTHS))}
            path = self.call(new_method_call(manager, "Subscribe", "a{sv}", (options,)))[0]
            self.accounts[path] = Account(path)
            sub = DBusAddress(path, "org.watchq1", "org.watchq1.Subscription")
            for tag, name in ((1, args.device), (2, args.marker)):
                self.call(new_method_call(
                    sub, "AddWatch", "sta{sv}", ("devices", tag, {"name": ("s", name)})))

    def call(self, message):
        """Sends a method call and returns its reply's body. Signals of this connection's
        earlier subscriptions arrive meanwhile; jeepney's send_and_get_reply would drop
        them, so every other message is handled as it comes."""
        from jeepney import HeaderFields, MessageType

        serial = next(self.conn.outgoing_serial)
        self.conn.send(message, serial=serial)
        while True:
            msg = self.conn.receive()
            if msg.header.fields.get(HeaderFields.reply_serial) == serial:
                if msg.header.message_type == MessageType.error:
                    sys.exit(f"{message.header.fields.get(HeaderFields.member)} failed: {msg.body}")
                return msg.body
            self.handle(msg)

    def fileno(self):
        return self.conn.sock.fileno()

    def read_one(self, timeout=None):
        self.handle(self.conn.receive(timeout=timeout))

    def handle(self, msg):
        from jeepney import HeaderFields, MessageType, new_error

        fields = msg.header.fields
        kind = msg.header.message_type
        if kind == MessageType.method_call:
            if self.args.ping == "unknown-method":
                self.conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s",
                                         ("no methods here",)))
            return
        if kind != MessageType.signal or fields.get(HeaderFields.sender) != self.owner:
            return
        account = self.accounts.get(fields.get(HeaderFields.path))
        if account is not None:
            account.signal(fields.get(HeaderFields.member), msg.body)

    def leave(self):
        from jeepney import DBusAddress, new_method_call

        for path in self.accounts:
            sub = DBusAddress(path, "org.watchq1", "org.watchq1.Subscription")
            self.conn.send(new_method_call(sub, "Close"))
        self.conn.close()

    def kill(self):
        self.conn.sock.close()


def drain(c):
    """Reads what the socket and jeepney's own buffer hold, without waiting for more."""
    try:
        while True:
            c.read_one(timeout=0.001)
    except (TimeoutError, BlockingIOError, OSError):
        pass


def run_jeepney(args, rng):
    conns = [JeepneyConnection(args, rng) for _ in range(args.connections)]
    print("ready", flush=True)
    reporting = False
    next_churn = time.monotonic() + rng.uniform(0.1, 0.5)
    while True:
        now = time.monotonic()
        line = stdin_line()
        if line == "report":
            reporting = True
            for c in conns:
                c.stalled_until = 0.0
        elif line == "":  # stdin closed
            return
        if not reporting and now >= next_churn:
            next_churn = now + rng.uniform(0.1, 0.5)
            victim = rng.randrange(len(conns))
            action = rng.choice(["stall", "stall", "kill", "leave"])
            if action == "stall":
                conns[victim].stalled_until = now + rng.uniform(1.0, 4.0)
            else:
                getattr(conns[victim], action)()
                conns[victim] = JeepneyConnection(args, rng)
        readable = [c for c in conns if c.stalled_until <= now]
        ready, _, _ = select.select(readable, [], [], 0.05)
        for c in ready:
            drain(c)
        if reporting and all(a.marked for c in conns for a in c.accounts.values()):
            for c in conns:
                for a in c.accounts.values():
                    print(a.line(), flush=True)
            print("done", flush=True)
            reporting = False
            # Keep reading (and answering) until told to stop.
            while stdin_line() != "":
                for c in select.select(conns, [], [], 0.1)[0]:
                    drain(c)
            return


# ---------------------------------------------------------------- GDBus

def run_gdbus(args, rng):
    import gi

    gi.require_version("Gio", "2.0")
    from gi.repository import Gio, GLib

    flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
             | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
    accounts = []
    keep = []
    for _ in range(args.connections):
        conn = Gio.DBusConnection.new_for_address_sync(args.address, flags, None, None)
        keep.append(conn)
        for _ in range(args.per_connection):
            options = {"queue-depth": GLib.Variant("u", rng.choice(DEPTHS))}
            (path,) = conn.call_sync(
                "org.watchq1", "/org/watchq1", "org.watchq1.Manager", "Subscribe",
                GLib.Variant("(a{sv})", (options,)), GLib.VariantType("(o)"),
                Gio.DBusCallFlags.NONE, -1, None).unpack()
            account = Account(path)
            accounts.append(account)
            conn.signal_subscribe(
                "org.watchq1", "org.watchq1.Subscription", None, path, None,
                Gio.DBusSignalFlags.NONE,
                lambda _c, _s, _p, _i, member, params, a=account: a.signal(member, params.unpack()))
            for tag, name in ((1, args.device), (2, args.marker)):
                conn.call_sync("org.watchq1", path, "org.watchq1.Subscription", "AddWatch",
                               GLib.Variant("(sta{sv})",
                                            ("devices", tag, {"name": GLib.Variant("s", name)})),
                               None, Gio.DBusCallFlags.NONE, -1, None)
    print("ready", flush=True)
    loop = GLib.MainLoop()
    state = {"reporting": False}

    def on_stdin(_fd, _cond):
        line = sys.stdin.readline()
        if line == "":
            loop.quit()
            return False
        if line.strip() == "report":
            state["reporting"] = True
        return True

    def check():
        if state["reporting"] and all(a.marked for a in accounts):
            for a in accounts:
                print(a.line(), flush=True)
            print("done", flush=True)
            state["reporting"] = False
        return True

    GLib.io_add_watch(sys.stdin.fileno(), GLib.IO_IN | GLib.IO_HUP, on_stdin)
    GLib.timeout_add(100, check)
    loop.run()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--library", required=True, choices=["jeepney", "gdbus"])
    parser.add_argument("--ping", choices=["ignore", "unknown-method"], default="ignore")
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--per-connection", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--seed", type=int, default=os.getpid())
    args = parser.parse_args()
    rng = random.Random(args.seed)
    {"jeepney": run_jeepney, "gdbus": run_gdbus}[args.library](args, rng)


if __name__ == "__main__":
    main()
