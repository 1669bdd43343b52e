//! The checked-in interface files (`dbus/org.watchq1.*.xml`): what part of an introspection
//! document they hold, and how they are written. Shared by `tests/interface.rs`, which
//! compares them with what the daemon serves, and `examples/bless-interface.rs`, which
//! writes them.
// Each of the two uses only part of this.
#![allow(dead_code)]

/// The `<interface name="NAME">…</interface>` element of an introspection document, from
/// the start of its line (so that its indentation is kept).
pub fn interface_element(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<interface name=\"{name}\">"))?;
    let end = start + xml[start..].find("</interface>")? + "</interface>".len();
    let line_start = xml[..start].rfind('\n').map_or(0, |i| i + 1);
    Some(xml[line_start..end].to_owned())
}

/// Indentation depends on the node's depth; compare without it.
pub fn normalized(element: &str) -> String {
    element
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The file `dbus/NAME.xml` for an interface element the daemon serves.
pub fn document(element: &str) -> String {
    format!(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<!-- Written from what the daemon serves by `cargo run --example bless-interface`;\n     tests/interface.rs keeps it equal to what the daemon serves.\n     Add members, never change one: clients depend on every signature here. -->\n<node>\n{element}\n</node>\n"
    )
}
