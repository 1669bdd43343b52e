#!/usr/bin/python3
"""A sandboxed app of the portal tests, written as Flatpak apps write theirs: GDBus
through PyGObject, on the session bus in $DBUS_SESSION_BUS_ADDRESS (the sandbox's
xdg-dbus-proxy).

    portal_client.py TOKEN [--wait]

Subscribes to the portal's signals (naming the portal as sender, so GDBus drops
signals from anyone else), calls CreateSession with session_handle_token TOKEN, and
prints one JSON line per thing that happens, flushed at once:
  {"created": PATH} or {"error": NAME, "message": TEXT}
  {"signal": "DeviceEvents"|"Lost"|"Closed", "session": PATH, "events": [...]}
  {"closed": PATH} or {"close-error": NAME, "path": PATH} for a Close it was told to make
With --wait, it reads one line on stdin before CreateSession (so that the test can
move it into a cgroup first). Reads commands on stdin, one per line: "close PATH" calls Close on PATH; "quit" exits.
"""

import json
import sys

from gi.repository import Gio, GLib

NAME = "org.freedesktop.portal.Watchq"
PATH = "/org/freedesktop/portal/watchq"
IFACE = "org.freedesktop.portal.Watchq"


def say(obj):
    print(json.dumps(obj), flush=True)


def main():
    token = sys.argv[1]
    bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
    loop = GLib.MainLoop()

    def on_portal_signal(_conn, _sender, _path, _iface, member, params):
        values = params.unpack()
        out = {"signal": member, "session": values[0]}
        if member == "DeviceEvents":
            out["events"] = [list(e) for e in values[1]]
        say(out)

    def on_session_signal(_conn, _sender, path, _iface, member, _params):
        say({"signal": member, "session": path})

    bus.signal_subscribe(NAME, IFACE, None, PATH, None, Gio.DBusSignalFlags.NONE,
                         on_portal_signal)
    bus.signal_subscribe(NAME, "org.freedesktop.portal.Session", "Closed", None, None,
                         Gio.DBusSignalFlags.NONE, on_session_signal)
    if sys.argv[2:] == ["--wait"]:
        sys.stdin.readline()
    try:
        reply = bus.call_sync(NAME, PATH, IFACE, "CreateSession",
                              GLib.Variant("(a{sv})", ({"session_handle_token":
                                                        GLib.Variant("s", token)},)),
                              GLib.VariantType("(o)"), Gio.DBusCallFlags.NONE, 10000, None)
        say({"created": reply.unpack()[0]})
    except GLib.Error as e:
        name = Gio.DBusError.get_remote_error(e)
        Gio.DBusError.strip_remote_error(e)
        say({"error": name, "message": e.message})

    def on_stdin(channel, _condition):
        line = channel.readline()
        if not line or line.strip() == "quit":
            loop.quit()
            return False
        words = line.split()
        if len(words) == 2 and words[0] == "close":
            try:
                bus.call_sync(NAME, words[1], "org.freedesktop.portal.Session", "Close",
                              None, None, Gio.DBusCallFlags.NONE, 10000, None)
                say({"closed": words[1]})
            except GLib.Error as e:
                say({"close-error": Gio.DBusError.get_remote_error(e), "path": words[1]})
        return True

    GLib.io_add_watch(GLib.IOChannel.unix_new(sys.stdin.fileno()), GLib.PRIORITY_DEFAULT,
                      GLib.IOCondition.IN | GLib.IOCondition.HUP, on_stdin)
    loop.run()


main()
