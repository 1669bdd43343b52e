//! `watchqctl`: look at and listen to watchqd.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;
use zbus::{OwnedVariant, Variant};

use watchqd::cli::ctl::{Args, Command};
use watchqd::client::{direct_unsupported, DirectSubscription, FilterEntry};
use watchqd::client::{Item, Subscription, DAEMON_RESTARTED};
use watchqd::client::{LostBody, ManagerProxy, ReceivedObject, WatchRemovedBody};
use watchqd::signal::{attributes_json, attributes_text};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("watchqctl: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let conn = watchqd::client::connect(args.address.as_deref())
        .await
        .map_err(|e| format!("cannot connect to the bus: {e}"))?;
    let manager = ManagerProxy::new(&conn).await.map_err(|e| e.to_string())?;
    match args.command {
        Command::Status { json } => status(&manager, json).await,
        Command::Devices { json } => devices(&manager, json).await,
        Command::Metrics => {
            let text = manager.metrics().await.map_err(|e| describe(&e))?;
            print!("{text}");
            Ok(())
        }
        Command::Monitor {
            json,
            bus,
            queue_depth,
            matches,
            subtypes,
            sources,
        } => {
            monitor(
                &conn,
                &manager,
                MonitorOptions {
                    json,
                    bus,
                    queue_depth,
                    matches,
                    subtypes,
                    sources,
                },
            )
            .await
        }
    }
}

fn describe(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(message), _) => format!("{message} ({name})"),
        // zbus reports the bus's own errors as FDO, never as MethodError.
        zbus::Error::FDO(e) if matches!(**e, zbus::fdo::Error::ServiceUnknown(_)) => {
            "watchqd is not running on this bus (org.watchq1 has no owner)".to_owned()
        }
        other => other.to_string(),
    }
}

async fn status(manager: &ManagerProxy<'_>, json: bool) -> Result<(), String> {
    let version = manager.version().await.map_err(|e| describe(&e))?;
    let sources = manager.sources().await.map_err(|e| describe(&e))?;
    let counters = manager.counters().await.map_err(|e| describe(&e))?;
    // A daemon older than Caller (or a bus policy without it) still gets a status.
    let me = manager
        .caller()
        .await
        .map_err(|e| describe(&e))
        .unwrap_or_else(|e| HashMap::from([("error".to_owned(), e)]));
    let label = me.get("label").map_or("none", String::as_str);
    let counters_of = |source: &str| -> Vec<(&str, u64)> {
        counters
            .iter()
            .filter(|(s, _, _)| s == source)
            .map(|(_, name, value)| (name.as_str(), *value))
            .collect()
    };
    if json {
        let value = serde_json::json!({
            "version": version,
            "caller": me,
            "sources": sources.iter().map(|s| serde_json::json!({
                "name": s.name, "available": s.available, "reason": s.reason, "subtypes": s.subtypes,
                "counters": counters_of(&s.name).into_iter()
                    .map(|(n, v)| (n.to_owned(), serde_json::Value::from(v)))
                    .collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{value}");
        return Ok(());
    }
    println!("watchqd {version}");
    // This connection as the daemon's policy sees it.
    match me.get("error") {
        Some(error) => println!("  caller: unknown ({error})"),
        None => println!(
            "  caller: uid {}, security label {label}",
            me.get("uid").map_or("?", String::as_str)
        ),
    }
    for source in sources {
        if source.available {
            println!(
                "  {:<12} available    ({})",
                source.name,
                source.subtypes.join(", ")
            );
            if !source.reason.is_empty() {
                // How it works, or how it is degraded: the note says which.
                println!("  {:<12} note: {}", "", source.reason);
            }
            let counted = counters_of(&source.name);
            if !counted.is_empty() {
                let list: Vec<String> = counted.iter().map(|(n, v)| format!("{n} {v}")).collect();
                println!("  {:<12} counted: {}", "", list.join(", "));
            }
        } else {
            println!("  {:<12} unavailable: {}", source.name, source.reason);
        }
    }
    Ok(())
}

async fn devices(manager: &ManagerProxy<'_>, json: bool) -> Result<(), String> {
    let (seq, objects) = manager
        .snapshot("devices")
        .await
        .map_err(|e| describe(&e))?;
    if json {
        let list: Vec<_> = objects.iter().map(object_json).collect();
        println!("{}", serde_json::json!({ "seq": seq, "devices": list }));
        return Ok(());
    }
    for (id, _, attributes, _) in &objects {
        println!("{id}\n    {}", attributes_text(attributes, &[]));
    }
    Ok(())
}

fn object_json(object: &ReceivedObject) -> serde_json::Value {
    let (id, changes, attributes, properties) = object;
    serde_json::json!({
        "id": id, "changes": changes,
        "attributes": attributes_json(attributes), "properties": properties,
    })
}

struct MonitorOptions {
    json: bool,
    bus: bool,
    queue_depth: Option<u32>,
    matches: Vec<String>,
    subtypes: Vec<String>,
    sources: Vec<String>,
}

async fn monitor(
    conn: &zbus::Connection,
    manager: &ManagerProxy<'_>,
    options: MonitorOptions,
) -> Result<(), String> {
    let available = manager.sources().await.map_err(|e| describe(&e))?;
    let sources: Vec<String> = if options.sources.is_empty() {
        available
            .iter()
            .filter(|s| s.available)
            .map(|s| s.name.clone())
            .collect()
    } else {
        options.sources.clone()
    };
    let mut spec: HashMap<&str, Variant<'_>> = HashMap::new();
    for m in &options.matches {
        let (key, value) = m
            .split_once('=')
            .ok_or_else(|| format!("--match takes KEY=VALUE, got '{m}'"))?;
        // Space thresholds, mounts' pid, key serials and uids are numbers on the bus; the
        // rest are strings.
        let typed = match key {
            "low-percent" | "pid" | "uid" => value.parse::<u32>().map(Variant::from),
            "low-bytes" => value.parse::<u64>().map(Variant::from),
            "serial" => value.parse::<i32>().map(Variant::from),
            _ => Ok(Variant::from(value)),
        };
        spec.insert(
            key,
            typed.map_err(|e| format!("--match {key} takes a number, got '{value}': {e}"))?,
        );
    }

    let mut subscription = Feed::open(conn, &options).await?;
    // Without named sources, every available one the caller is allowed to watch.
    let implicit = options.sources.is_empty();
    let mut refused = Vec::new();
    let mut needs_options = Vec::new();
    for (index, source) in sources.iter().enumerate() {
        let tag = u64::try_from(index).unwrap_or(u64::MAX) + 1;
        let spec = spec
            .iter()
            .map(|(k, v)| Ok(((*k).to_owned(), v.try_to_owned()?)))
            .collect::<zbus::Result<HashMap<String, OwnedVariant>>>()
            .map_err(|e| e.to_string())?;
        match subscription.add_watch(source, tag, spec).await {
            Ok(()) => {}
            Err(zbus::Error::MethodError(name, _, _))
                if implicit && name.as_str() == "org.watchq1.Error.AccessDenied" =>
            {
                refused.push(source.clone());
            }
            // Sources that need options (a path) are left out of "every source".
            Err(zbus::Error::MethodError(name, _, _))
                if implicit && name.as_str() == "org.watchq1.Error.InvalidArgument" =>
            {
                needs_options.push(source.clone());
            }
            Err(e) => return Err(format!("cannot watch {source}: {}", describe(&e))),
        }
    }
    let sources: Vec<String> = sources
        .into_iter()
        .filter(|s| !refused.contains(s) && !needs_options.contains(s))
        .collect();
    if sources.is_empty() {
        return Err(format!(
            "not allowed to watch any source ({})",
            refused.join(", ")
        ));
    }
    if !options.subtypes.is_empty() {
        let filter = sources
            .iter()
            .map(|s| (s.clone(), options.subtypes.clone()))
            .collect();
        subscription
            .set_filter(filter)
            .await
            .map_err(|e| format!("cannot set the filter: {}", describe(&e)))?;
    }
    // On stderr even with --json, so that scripts can wait for it.
    let not_allowed = if refused.is_empty() {
        String::new()
    } else {
        format!(" (not allowed: {})", refused.join(", "))
    };
    let not_allowed = if needs_options.is_empty() {
        not_allowed
    } else {
        format!(
            "{not_allowed} (need --match options: {})",
            needs_options.join(", ")
        )
    };
    let path = subscription.path();
    let via = match subscription {
        Feed::Direct(_) => " on a connection of its own",
        Feed::Bus(_) => "",
    };
    eprintln!(
        "watching {}{not_allowed} (subscription {path}){via}; Ctrl-C to stop",
        sources.join(", ")
    );

    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => break,
            item = subscription.next() => match item {
                None => return Err("the bus connection closed".into()),
                Some(Err(e)) => return Err(format!("receiving: {e}")),
                Some(Ok(item)) => print_item(item, options.json),
            }
        }
    }
    let _ = subscription.close().await;
    Ok(())
}

/// The subscription `monitor` reads: direct by default, on the bus with `--bus` or where
/// the daemon or the bus cannot hand over a connection.
enum Feed {
    Bus(Subscription),
    Direct(DirectSubscription),
}

impl Feed {
    async fn open(conn: &zbus::Connection, options: &MonitorOptions) -> Result<Feed, String> {
        if !options.bus {
            let mut direct_options = HashMap::new();
            if let Some(depth) = options.queue_depth {
                direct_options.insert("queue-depth".to_owned(), OwnedVariant::from(depth));
            }
            match DirectSubscription::open(conn, direct_options).await {
                Ok(direct) => return Ok(Feed::Direct(direct)),
                Err(e) if direct_unsupported(&e) => eprintln!(
                    "watchqctl: no direct subscription here ({}); using the bus",
                    describe(&e)
                ),
                Err(e) => return Err(describe(&e)),
            }
        }
        let mut builder = Subscription::builder(conn);
        if let Some(depth) = options.queue_depth {
            builder = builder.queue_depth(depth);
        }
        // The subscription object and its signal stream exist before any watch, so no
        // event can be missed; it accepts only what the daemon holding it sends.
        Ok(Feed::Bus(builder.build().await.map_err(|e| describe(&e))?))
    }

    async fn add_watch(
        &mut self,
        kind: &str,
        tag: u64,
        spec: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<()> {
        match self {
            Feed::Bus(s) => s.add_watch(kind, tag, spec).await,
            Feed::Direct(s) => s.add_watch(kind, tag, spec).await,
        }
    }

    async fn set_filter(&mut self, filter: Vec<FilterEntry>) -> zbus::Result<()> {
        match self {
            Feed::Bus(s) => s.set_filter(filter).await,
            Feed::Direct(s) => s.set_filter(filter).await,
        }
    }

    fn path(&self) -> String {
        match self {
            Feed::Bus(s) => s.path(),
            Feed::Direct(s) => s.path(),
        }
        .map(ToString::to_string)
        .unwrap_or_default()
    }

    async fn next(&mut self) -> Option<zbus::Result<Item>> {
        match self {
            Feed::Bus(s) => s.next().await,
            Feed::Direct(s) => s.next().await,
        }
    }

    async fn close(self) -> zbus::Result<()> {
        match self {
            Feed::Bus(s) => s.close().await,
            Feed::Direct(s) => s.close().await,
        }
    }
}

/// Prints what the subscription hands out: events on stdout; the daemon's absence on
/// stderr as it happens, and the gap it leaves on stdout, in the events' own format.
fn print_item(item: Item, json: bool) {
    match item {
        Item::Signal(message) => print_signal(&message, json),
        Item::DaemonGone { previous_owner } => eprintln!(
            "watchqctl: watchqd ({previous_owner}) left the bus; events are missed until it is back; subscribing again"
        ),
        Item::Retrying { error, retry_in } => eprintln!(
            "watchqctl: watchqd is not back ({}); trying again in {:.1} s",
            describe(&error),
            retry_in.as_secs_f64()
        ),
        Item::Restarted(restart) => {
            eprintln!(
                "watchqctl: watchqd is back ({}); watching again (subscription {}); numbering starts again at #1",
                restart.owner, restart.path
            );
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "signal": "Lost", "seq": 0, "count": 0, "source": "*",
                        "reason": DAEMON_RESTARTED, "next_seq": 1,
                        "subscription": restart.path.as_str(),
                    })
                );
            } else {
                println!(
                    "#-      LOST an unknown number of events ({DAEMON_RESTARTED}); new subscription {}, numbering starts again at #1",
                    restart.path
                );
            }
        }
        Item::WatchNotRestored { tag, kind, error } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "signal": "WatchNotRestored", "tag": tag, "source": kind,
                        "error": error_name(&error), "message": describe(&error),
                    })
                );
            } else {
                println!(
                    "#-      watch {tag} ({kind}) not restored after the restart: {}",
                    describe(&error)
                );
            }
        }
        Item::FilterNotRestored { error } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "signal": "FilterNotRestored",
                        "error": error_name(&error), "message": describe(&error),
                    })
                );
            } else {
                println!(
                    "#-      filter not restored after the restart, every subtype passes: {}",
                    describe(&error)
                );
            }
        }
    }
}

/// The D-Bus error name of a failed call, or "" for a failure that is not a D-Bus error.
fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(e) => zbus::DBusError::name(&**e).to_string(),
        _ => String::new(),
    }
}

fn print_signal(message: &zbus::Message, json: bool) {
    let header = message.header();
    let Some(member) = header.member() else {
        return;
    };
    let body = message.body();
    let line = match member.as_str() {
        "Lost" => body.deserialize::<LostBody>().ok().map(|(seq, count, source, reason)| {
            if json {
                serde_json::json!({"signal": "Lost", "seq": seq, "count": count, "source": source, "reason": reason}).to_string()
            } else if count == 0 {
                format!("#{seq:<6} LOST an unknown number of {source} events ({reason}); state was rescanned")
            } else {
                format!("#{seq:<6} LOST {count} {source} events ({reason})")
            }
        }),
        "WatchRemoved" => body.deserialize::<WatchRemovedBody>().ok().map(|(seq, tag, reason)| {
            if json {
                serde_json::json!({"signal": "WatchRemoved", "seq": seq, "tag": tag, "reason": reason}).to_string()
            } else {
                format!("#{seq:<6} watch {tag} removed: {reason}")
            }
        }),
        // Events: printed by their source's signal type.
        other => watchqd::source::signal_named(other).and_then(|kind| kind.render(message, json)),
    };
    if let Some(line) = line {
        println!("{line}");
    }
}
