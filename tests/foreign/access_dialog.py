#!/usr/bin/python3
"""The desktop's access dialog for the portal tests: a real D-Bus service standing for
the desktop's UI (org.freedesktop.impl.portal.Access at /org/freedesktop/portal/desktop),
written with GDBus as xdg-desktop-portal backends are.

    access_dialog.py NAME yes|no

Owns NAME on $DBUS_SESSION_BUS_ADDRESS, prints {"ready": NAME} once it does, then
answers every AccessDialog with response 0 (yes) or 1 (no) and prints
{"app_id": ..., "title": ...} for each.
"""

import json
import sys

from gi.repository import Gio, GLib

XML = """<node><interface name="org.freedesktop.impl.portal.Access">
<method name="AccessDialog">
  <arg type="o" name="handle" direction="in"/><arg type="s" name="app_id" direction="in"/>
  <arg type="s" name="parent_window" direction="in"/><arg type="s" name="title" direction="in"/>
  <arg type="s" name="subtitle" direction="in"/><arg type="s" name="body" direction="in"/>
  <arg type="a{sv}" name="options" direction="in"/>
  <arg type="u" name="response" direction="out"/><arg type="a{sv}" name="results" direction="out"/>
</method></interface></node>"""


def main():
    name, answer = sys.argv[1], sys.argv[2]
    response = 0 if answer == "yes" else 1
    bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
    info = Gio.DBusNodeInfo.new_for_xml(XML).interfaces[0]

    def on_call(_conn, _sender, _path, _iface, _method, params, invocation):
        values = params.unpack()
        print(json.dumps({"app_id": values[1], "title": values[3]}), flush=True)
        invocation.return_value(GLib.Variant("(ua{sv})", (response, {})))

    bus.register_object("/org/freedesktop/portal/desktop", info, on_call, None, None)
    reply = bus.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                          "org.freedesktop.DBus", "RequestName", GLib.Variant("(su)", (name, 4)),
                          GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, -1, None)
    if reply.unpack()[0] != 1:
        sys.exit(f"could not own {name}")
    print(json.dumps({"ready": name}), flush=True)
    GLib.MainLoop().run()


main()
