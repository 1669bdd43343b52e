#!/usr/bin/python3
"""A watchqd subscriber written with a D-Bus library we did not write, for the tests.

    subscriber.py --address ADDR --library jeepney|gdbus|dbus-python
                  [--ping ignore|unknown-method] [--queue-depth N] [--direct]
                  KIND KEY=VALUE...

Subscribes, adds one watch (tag 1) of KIND with the string spec KEY=VALUE..., prints
"subscribed PATH" and then one line per signal from the subscription:
"MEMBER SEQ COUNT" (COUNT is Lost's count, 1 for any other signal), flushed at once;
jeepney also prints "call MEMBER" for every method call it receives (Pings).

jeepney never answers org.freedesktop.DBus.Peer.Ping by itself (as measured in the
wild): with --ping ignore it does not answer at all, with --ping unknown-method it
answers every method call with org.freedesktop.DBus.Error.UnknownMethod. GDBus and
libdbus (dbus-python) answer Ping themselves.

--direct (GDBus only): the subscription is opened with SubscribeDirect, and its signals
are read on the peer-to-peer connection made on the fd it returns
(g_dbus_connection_new_sync on a socket from the fd), where messages have no sender.

Only signals whose sender is the current owner of org.watchq1 and whose path is our
subscription are printed, as the README tells client authors to do.
"""

import argparse
import sys


def emit(member, body):
    seq = body[0]
    count = body[1] if member == "Lost" else 1
    print(f"{member} {seq} {count}", flush=True)


def run_jeepney(args, spec):
    from jeepney import DBusAddress, MessageType, new_error, new_method_call
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    conn = open_dbus_connection(bus=args.address)
    owner = conn.send_and_get_reply(message_bus.GetNameOwner("org.watchq1")).body[0]
    manager = DBusAddress("/org/watchq1", "org.watchq1", "org.watchq1.Manager")
    options = {}
    if args.queue_depth:
        options["queue-depth"] = ("u", args.queue_depth)
    reply = conn.send_and_get_reply(new_method_call(manager, "Subscribe", "a{sv}", (options,)))
    if reply.header.message_type == MessageType.error:
        sys.exit(f"Subscribe failed: {reply.body}")
    path = reply.body[0]
    subscription = DBusAddress(path, "org.watchq1", "org.watchq1.Subscription")
    variant_spec = {k: ("s", v) for k, v in spec.items()}
    call = new_method_call(subscription, "AddWatch", "sta{sv}", (args.kind, 1, variant_spec))
    # Nothing is sent to us before the watch exists, so nothing is missed while
    # send_and_get_reply waits for its reply.
    reply = conn.send_and_get_reply(call)
    if reply.header.message_type == MessageType.error:
        sys.exit(f"AddWatch failed: {reply.body}")
    print(f"subscribed {path}", flush=True)
    while True:
        handle_jeepney(args, conn, conn.receive(), owner, path, new_error)


def handle_jeepney(args, conn, msg, owner, path, new_error):
    from jeepney import HeaderFields, MessageType

    fields = msg.header.fields
    kind = msg.header.message_type
    if kind == MessageType.method_call:
        print(f"call {fields.get(HeaderFields.member)}", flush=True)
        if args.ping == "unknown-method":
            conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s",
                                ("this client implements no methods",)))
        return
    if kind != MessageType.signal:
        return
    if fields.get(HeaderFields.sender) != owner or fields.get(HeaderFields.path) != path:
        return
    if fields.get(HeaderFields.interface) != "org.watchq1.Subscription":
        return
    emit(fields.get(HeaderFields.member), msg.body)


def run_gdbus(args, spec):
    import gi

    gi.require_version("Gio", "2.0")
    from gi.repository import Gio, GLib

    flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
             | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
    conn = Gio.DBusConnection.new_for_address_sync(args.address, flags, None, None)
    options = {}
    if args.queue_depth:
        options["queue-depth"] = GLib.Variant("u", args.queue_depth)
    if args.direct:
        run_gdbus_direct(args, spec, conn, options)
        return
    (path,) = conn.call_sync("org.watchq1", "/org/watchq1", "org.watchq1.Manager", "Subscribe",
                             GLib.Variant("(a{sv})", (options,)), GLib.VariantType("(o)"),
                             Gio.DBusCallFlags.NONE, -1, None).unpack()

    def on_signal(_conn, _sender, _path, _interface, member, params):
        emit(member, params.unpack())

    # With a well-known sender GDBus tracks its owner and drops anyone else's signals.
    conn.signal_subscribe("org.watchq1", "org.watchq1.Subscription", None, path, None,
                          Gio.DBusSignalFlags.NONE, on_signal)
    variant_spec = {k: GLib.Variant("s", v) for k, v in spec.items()}
    conn.call_sync("org.watchq1", path, "org.watchq1.Subscription", "AddWatch",
                   GLib.Variant("(sta{sv})", (args.kind, 1, variant_spec)), None,
                   Gio.DBusCallFlags.NONE, -1, None)
    print(f"subscribed {path}", flush=True)
    GLib.MainLoop().run()


def run_gdbus_direct(args, spec, bus, options):
    import gi

    gi.require_version("Gio", "2.0")
    from gi.repository import Gio, GLib

    reply, fds = bus.call_with_unix_fd_list_sync(
        "org.watchq1", "/org/watchq1", "org.watchq1.Manager", "SubscribeDirect",
        GLib.Variant("(a{sv})", (options,)), GLib.VariantType("(oh)"),
        Gio.DBusCallFlags.NONE, -1, None, None)
    path, index = reply.unpack()
    socket = Gio.Socket.new_from_fd(fds.get(index))
    stream = socket.connection_factory_create_connection()
    # The bus connection stays open: the subscription ends when its opener leaves.
    conn = Gio.DBusConnection.new_sync(
        stream, None, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT, None, None)

    def on_signal(_conn, _sender, _path, _interface, member, params):
        emit(member, params.unpack())

    # A peer-to-peer connection has one peer, the daemon: no sender to check.
    conn.signal_subscribe(None, "org.watchq1.Subscription", None, path, None,
                          Gio.DBusSignalFlags.NONE, on_signal)
    variant_spec = {k: GLib.Variant("s", v) for k, v in spec.items()}
    conn.call_sync(None, path, "org.watchq1.Subscription", "AddWatch",
                   GLib.Variant("(sta{sv})", (args.kind, 1, variant_spec)), None,
                   Gio.DBusCallFlags.NONE, -1, None)
    print(f"subscribed {path}", flush=True)
    GLib.MainLoop().run()


def run_dbus_python(args, spec):
    import dbus
    from dbus.mainloop.glib import DBusGMainLoop
    from gi.repository import GLib

    DBusGMainLoop(set_as_default=True)
    bus = dbus.bus.BusConnection(args.address)
    manager = dbus.Interface(bus.get_object("org.watchq1", "/org/watchq1"), "org.watchq1.Manager")
    options = dbus.Dictionary({}, signature="sv")
    if args.queue_depth:
        options["queue-depth"] = dbus.UInt32(args.queue_depth)
    path = manager.Subscribe(options)

    def on_signal(*body, member=None):
        emit(member, body)

    # libdbus resolves the well-known sender to its owner and drops other senders.
    bus.add_signal_receiver(on_signal, dbus_interface="org.watchq1.Subscription",
                            bus_name="org.watchq1", path=path, member_keyword="member")
    subscription = dbus.Interface(bus.get_object("org.watchq1", path), "org.watchq1.Subscription")
    subscription.AddWatch(args.kind, dbus.UInt64(1), dbus.Dictionary(spec, signature="sv"))
    print(f"subscribed {path}", flush=True)
    GLib.MainLoop().run()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--library", required=True, choices=["jeepney", "gdbus", "dbus-python"])
    parser.add_argument("--ping", choices=["ignore", "unknown-method"], default="ignore")
    parser.add_argument("--queue-depth", type=int, default=0)
    parser.add_argument("--direct", action="store_true")
    parser.add_argument("kind")
    parser.add_argument("spec", nargs="*")
    args = parser.parse_args()
    spec = dict(pair.split("=", 1) for pair in args.spec)
    {"jeepney": run_jeepney, "gdbus": run_gdbus, "dbus-python": run_dbus_python}[args.library](
        args, spec)


if __name__ == "__main__":
    main()
