//! watchqd against the raw bus, in one run on one private bus (dbus-daemon; dbus-broker
//! with `WATCHQD_TEST_BUS=dbus-broker`).
//!
//! `cargo bench --bench delivery` prints every figure and its ratio to the ceiling
//! measured in the same run (these machines are shared and noisy: only ratios mean
//! anything), and each target of [`TARGETS`] as MET, MISSED or KNOWN-MISS.
//! `cargo bench --bench delivery -- --check` runs a shorter size (about two minutes on a
//! quiet 2-core machine; CI runs it) and exits non-zero when a target is MISSED, or was
//! not measured at all. Under `cargo test` (no `--bench` argument) it runs a small smoke
//! version so that the benchmark itself cannot rot; the smoke run fails on nothing and
//! prints each target as SMOKE (its figures are too small to hold to a target).
//!
//! - ceiling: a plain zbus emitter sends equally sized unicast signals (the body of a
//!   real DeviceChanged) to one subscriber;
//! - watchqd: real kernel uevents (`change` written to `/sys/block/loopN/uevent`) through
//!   the daemon to 1, 10, 100 and 1,000 subscriptions, with filters letting a share
//!   through;
//! - latency from just before the kernel event (or the raw send) to receipt;
//! - the daemon's CPU per delivered event, RSS idle and after each run, wakeups while idle.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code, clippy::all)]
mod common;
mod targets;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{context_switches, cpu_ticks, Daemon, LoopDevice, Subscriber};
use futures_util::StreamExt;
use targets::{Bound, Target, Verdicts};
use zbus::{Connection, MessageStream, Variant};

/// Every target of this benchmark. Latencies are what watchqd adds to the raw emitter's
/// (kernel uevent to subscriber, against send to receipt); throughputs are ratios to the
/// raw emitter's rate in the same run; CPU per signal is the daemon's user+system time
/// per delivered signal against the bus daemon's for the same signals (the one process
/// every signal crosses either way), at one subscriber and at 1,000 (where one uevent
/// serves many signals). The receivers add no match rules, as `watchqd::client` does
/// not: with a rule per subscription dbus-daemon spent 72 us per signal at 1,000
/// subscriptions (0.07x), without them 16 us (0.24x; watchqd's own ~4 us unchanged). A
/// credit window of 2, which the throughput ratios did not notice, cost 0.23x against
/// the 72 us, about 1x against the 16 us.
const TARGETS: &[Target] = &[
    Target {
        id: "idle-wakeups",
        what: "wakeups/s while idle, no watches",
        bound: Bound::AtMost(0.0),
        known_miss: None,
    },
    Target {
        id: "idle-rss",
        what: "RSS idle, KiB",
        bound: Bound::AtMost(10.0 * 1024.0),
        known_miss: None,
    },
    Target {
        id: "added-p50",
        what: "added latency p50, us",
        bound: Bound::AtMost(50.0),
        known_miss: Some(
            "the daemon alone spends about 50 us of CPU on one signal to one subscriber \
             (reading the uevent and the device's attributes, encoding; see cpu-per-signal), \
             and its tasks' wakeups come on top: ~100 us measured on a loaded 2-core machine",
        ),
    },
    Target {
        id: "added-p99",
        what: "added latency p99, us",
        bound: Bound::AtMost(500.0),
        known_miss: Some(
            "on 2 cores shared by the writer, the daemon, the bus and the receiver the tail \
             is scheduling: ~1.5 ms added measured on a loaded machine (the raw p99 itself \
             was 2.6 ms)",
        ),
    },
    Target {
        id: "rate-1",
        what: "1 subscriber, signals/s as a share of the ceiling",
        bound: Bound::AtLeast(0.9),
        known_miss: Some(
            "with both cores saturated the rate is bound by the CPU all processes spend per \
             signal: ~60 us on the raw path (bus, emitter, receiver), ~110 us through \
             watchqd (the writer's uevent, the daemon, the bus, the receiver), so ~0.55x is \
             what 2 cores allow at one subscriber (0.56x measured); with more subscriptions \
             one uevent serves many signals (rate-1000 holds)",
        ),
    },
    Target {
        id: "rate-1000",
        what: "1,000 subscriptions, signals/s as a share of the ceiling",
        // 0.45x and 0.48x while every subscription added a match rule (dbus-daemon
        // walked 1,000 rules per signal, ~72 us); 1.28x and 0.88x without them, on a
        // loaded machine. cpu-per-signal-1000 is what catches a slower daemon at scale.
        bound: Bound::AtLeast(0.5),
        known_miss: None,
    },
    Target {
        id: "cpu-per-signal",
        what: "daemon CPU per delivered signal, 1 subscriber, as a multiple of dbus-daemon's",
        // 1.2x-1.8x in four runs on a loaded machine (clock ticks: +-8% on dbus-daemon's).
        bound: Bound::AtMost(2.5),
        known_miss: None,
    },
    Target {
        id: "cpu-per-signal-1000",
        what:
            "daemon CPU per delivered signal, 1,000 subscriptions, as a multiple of dbus-daemon's",
        // Against dbus-daemon routing unicast signals to receivers with no match rules
        // (16 us per signal): 0.24x measured. A credit window of 2 would be about 1x.
        bound: Bound::AtMost(0.4),
        known_miss: None,
    },
    Target {
        id: "direct-rate-1",
        what: "1 direct subscriber (SubscribeDirect), signals/s as a multiple of the bus ceiling",
        bound: Bound::AtLeast(2.0),
        known_miss: Some(
            "0.98x-1.11x in two runs (78,901/s against 70,940/s): at one subscriber each \
             signal is one uevent, and the CPU per signal is the writer's write and the \
             kernel's uevent, the daemon's reading of it and of the device's attributes \
             and its encoding (12 us of daemon CPU per signal at 1 subscriber, 2.5-3.3 us \
             at 1,000; a third of it zbus serializing the signal) and the receiver: two \
             cores allow about what is measured. 1,000 direct subscriptions reach 9.4x \
             the ceiling",
        ),
    },
    Target {
        id: "direct-vs-p2p",
        what: "1 direct subscriber, signals/s as a multiple of a raw zbus peer-to-peer emitter's",
        bound: Bound::AtLeast(0.9),
        known_miss: Some(
            "0.31x-0.35x in two runs (78,901/s against 226,785/s): the raw emitter sends \
             one prepared body and reads no kernel; the direct row pays for a uevent per signal (see \
             direct-rate-1)",
        ),
    },
    Target {
        id: "direct-rate-1000",
        what: "1,000 direct subscriptions with per-subscriber filters, aggregate signals/s \
               as a multiple of the bus ceiling of one subscriber",
        // 9.37x-9.43x measured: one uevent serves 100 signals, and no bus is crossed.
        bound: Bound::AtLeast(1.0),
        known_miss: None,
    },
    Target {
        id: "direct-added-p50",
        what: "1 direct subscriber: latency from the uevent's write, less the raw p2p \
               emitter's, p50, us",
        bound: Bound::AtMost(50.0),
        known_miss: Some(
            "19 us to 59 us in three runs before deliveries stopped being timed for every \
             source, -12 us and 14 us in two after: the figure includes the kernel's \
             uevent and the daemon's reading of the device (the raw emitter's has \
             neither), and the raw p2p baseline it is taken from moves between 12 us and \
             43 us from run to run",
        ),
    },
    Target {
        id: "direct-added-p99",
        what: "1 direct subscriber: latency from the uevent's write, less the raw p2p \
               emitter's, p99, us",
        // 83 us measured.
        bound: Bound::AtMost(500.0),
        known_miss: None,
    },
    Target {
        id: "rss-growth",
        what: "RSS growth when the last run is repeated, KiB",
        // 0 KiB in three runs on a loaded machine, 1,240 KiB in a fourth; a credit window
        // of 2 (a backlog in the daemon) grew it by 10,640 KiB, but so did a fresh-clone
        // .ci/run of correct code on a quiet machine (10,848 KiB): VmRSS after one repeat
        // cannot tell a leak from where the allocator's arenas landed.
        bound: Bound::AtMost(4096.0),
        known_miss: Some(
            "RSS after one repeat of a run varies with the allocator's arenas: 0 to 1.2 MiB \
             in four runs on a loaded machine, 10.8 MiB in a quiet fresh-clone CI run of \
             correct code, as much as a sabotaged credit window gave; cpu-per-signal-1000 \
             catches that sabotage, and the soak's two-round heap check (benches/soak.rs, \
             +8 KiB on the second round) is the leak check",
        ),
    },
];

struct Figures {
    quick: bool,
    lines: Vec<String>,
    verdicts: Verdicts,
}

impl Figures {
    fn say(&mut self, line: String) {
        println!("{line}");
        self.lines.push(line);
    }

    /// Holds `value` to the target `id` of [`TARGETS`]; `detail` says what it is made of.
    fn target(&mut self, id: &'static str, value: f64, detail: String) {
        let line = self.verdicts.target(id, value, &detail);
        self.say(line);
    }
}

fn percentile(sorted: &[Duration], permille: usize) -> Duration {
    sorted[(sorted.len() - 1) * permille / 1000]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// CPU time per delivered signal of the three processes a signal crosses, in us, from
/// two readings of (daemon, bus, this process) clock ticks.
fn cpu_split(before: [u64; 3], after: [u64; 3], delivered: u64) -> [f64; 3] {
    let per =
        |i: usize| (after[i] - before[i]) as f64 / ticks_per_second() * 1e6 / delivered as f64;
    [per(0), per(1), per(2)]
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// Counts DeviceChanged signals arriving on one connection until `expected`, adding each
/// to `progress`.
async fn count_until(
    mut stream: MessageStream,
    expected: u64,
    progress: Arc<AtomicU64>,
) -> Instant {
    let mut seen = 0;
    while seen < expected {
        let message = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a receiver stalled for 60 s")
            .expect("stream ended")
            .expect("message");
        if message.header().member().map(|m| m.as_str()) == Some("DeviceChanged") {
            seen += 1;
            progress.fetch_add(1, Ordering::Relaxed);
        } else if message.header().member().map(|m| m.as_str()) == Some("Lost") {
            panic!("a receiver lost events; raise its queue depth");
        }
    }
    Instant::now()
}

/// Every message the connection receives, with no match rule on the bus (as
/// `watchqd::client` reads its subscriptions: the signals are unicast, and each rule is
/// one more the bus walks per message); the counters look at signals' members only.
async fn signal_stream(conn: &Connection) -> MessageStream {
    if let Some(queue) = std::num::NonZeroUsize::new(1_000_000) {
        conn.clone().set_max_queued(queue);
    }
    MessageStream::from(conn)
}

/// Makes the kernel emit `n` synthetic `change` uevents for a block device. The file stays
/// open: sysfs takes every write as a new request, and the open and close that
/// `fs::write` adds per event would cost the writer, on the same cores as the daemon, more
/// than the kernel's uevent itself, which the ceiling's emitter does not pay.
fn write_changes(name: &str, n: u64) {
    use std::io::Write;
    let path = format!("/sys/block/{name}/uevent");
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for _ in 0..n {
        file.write_all(b"change").unwrap();
    }
}

/// A zbus peer-to-peer connection pair on a socket pair: (server, client).
async fn p2p_pair() -> (Connection, Connection) {
    use zbus::connection::{AuthMechanism, Builder};
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let server = Builder::unix_stream(a)
        .server(zbus::Guid::generate())
        .p2p()
        .auth_mechanism(AuthMechanism::Anonymous)
        .build();
    let client = Builder::unix_stream(b)
        .p2p()
        .auth_mechanism(AuthMechanism::Anonymous)
        .build();
    let (server, client) = tokio::join!(server, client);
    (server.unwrap(), client.unwrap())
}

/// Waits for the next DeviceChanged on `stream`.
async fn next_device_changed(stream: &mut MessageStream) {
    loop {
        let m = stream.next().await.unwrap().unwrap();
        if m.header().member().map(|m| m.as_str()) == Some("DeviceChanged") {
            return;
        }
    }
}

/// The raw peer-to-peer ceiling: `body` emitted on a zbus p2p connection, one at a time
/// `reps` times (latency), then `flood` at once (rate).
async fn raw_p2p(
    body: &watchqd::source::devices::signal::DeviceChanged<'_>,
    flood: u64,
    reps: usize,
) -> (f64, Vec<Duration>) {
    let (emitter, receiver) = p2p_pair().await;
    let mut stream = signal_stream(&receiver).await;
    let emit = || {
        emitter.emit_signal(
            None::<&str>,
            "/bench",
            "org.watchq1.Bench",
            "DeviceChanged",
            body,
        )
    };
    let mut latencies = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        emit().await.unwrap();
        next_device_changed(&mut stream).await;
        latencies.push(start.elapsed());
    }
    let counter = tokio::spawn(count_until(stream, flood, Arc::default()));
    let start = Instant::now();
    for _ in 0..flood {
        emit().await.unwrap();
    }
    let end = counter.await.unwrap();
    (flood as f64 / (end - start).as_secs_f64(), latencies)
}

/// A direct subscription opened on `bus` (queue 65536) watching the block device `disk`:
/// its connection, its path and every message on it.
async fn open_direct(
    bus: &Connection,
    disk: &str,
) -> (Connection, zbus::OwnedObjectPath, MessageStream) {
    use zbus::connection::{AuthMechanism, Builder};
    let manager = watchqd::client::ManagerProxy::new(bus).await.unwrap();
    let (path, fd) = manager
        .subscribe_direct(HashMap::from([("queue-depth", Variant::from(65536u32))]))
        .await
        .unwrap();
    let socket = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(fd));
    socket.set_nonblocking(true).unwrap();
    let conn = Builder::unix_stream(socket)
        .p2p()
        .auth_mechanism(AuthMechanism::Anonymous)
        .build()
        .await
        .unwrap();
    let stream = signal_stream(&conn).await;
    let spec = HashMap::from([("name", Variant::from(disk))]);
    conn.call_method(
        None::<&str>,
        &path,
        Some("org.watchq1.Subscription"),
        "AddWatch",
        &("devices", 1u64, spec),
    )
    .await
    .unwrap();
    (conn, path, stream)
}

/// One direct subscription watching `disk`: latency from the uevent write, `reps` times,
/// then the rate of `flood` uevents and the CPU per signal of the daemon and of this
/// process (the writer and the receiver), in us.
async fn direct_one(
    daemon: &Daemon,
    disk: &str,
    flood: u64,
    reps: usize,
) -> (f64, Vec<Duration>, [f64; 2]) {
    use std::io::Write;
    let bus = watchqd::client::connect(Some(daemon.address()))
        .await
        .unwrap();
    let (conn, _, mut stream) = open_direct(&bus, disk).await;
    let mut uevent = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/sys/block/{disk}/uevent"))
        .unwrap();
    let mut latencies = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        uevent.write_all(b"change").unwrap();
        next_device_changed(&mut stream).await;
        latencies.push(start.elapsed());
    }
    let counter = tokio::spawn(count_until(stream, flood, Arc::default()));
    let (pid, me) = (daemon.pid(), std::process::id());
    let before = [cpu_ticks(pid), 0, cpu_ticks(me)];
    let start = Instant::now();
    let name = disk.to_owned();
    tokio::task::spawn_blocking(move || write_changes(&name, flood))
        .await
        .unwrap();
    let end = counter.await.unwrap();
    let [daemon_us, _, me_us] = cpu_split(before, [cpu_ticks(pid), 0, cpu_ticks(me)], flood);
    drop(conn);
    (
        flood as f64 / (end - start).as_secs_f64(),
        latencies,
        [daemon_us, me_us],
    )
}

/// `subscriptions` direct subscriptions watching `disk` (100 per bus connection, the
/// configured limit), of which `receivers` let the events through and the rest filter
/// them out: the aggregate rate of `per_sub` uevents to each receiver.
async fn direct_many(
    daemon: &Daemon,
    disk: &str,
    subscriptions: usize,
    receivers: usize,
    per_sub: u64,
) -> f64 {
    let mut buses = Vec::new();
    let mut links = Vec::new();
    let mut counters = Vec::new();
    for i in 0..subscriptions {
        if i % 100 == 0 {
            buses.push(
                watchqd::client::connect(Some(daemon.address()))
                    .await
                    .unwrap(),
            );
        }
        let (conn, path, stream) = open_direct(buses.last().unwrap(), disk).await;
        if i < receivers {
            counters.push(tokio::spawn(count_until(stream, per_sub, Arc::default())));
        } else {
            // Lets nothing of this run through: only additions pass.
            drop(stream);
            conn.call_method(
                None::<&str>,
                &path,
                Some("org.watchq1.Subscription"),
                "SetFilter",
                &(vec![("devices", vec!["add"])],),
            )
            .await
            .unwrap();
        }
        links.push(conn);
    }
    let start = Instant::now();
    let name = disk.to_owned();
    tokio::task::spawn_blocking(move || write_changes(&name, per_sub))
        .await
        .unwrap();
    let mut end = start;
    for counter in counters {
        end = end.max(counter.await.unwrap());
    }
    drop((links, buses));
    (per_sub * receivers as u64) as f64 / (end - start).as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let quick = !args.iter().any(|a| a == "--bench");
    let check = args.iter().any(|a| a == "--check");
    let mut out = Figures {
        quick,
        lines: Vec::new(),
        verdicts: Verdicts::new(TARGETS).smoke(quick),
    };
    // (signals per flood, latency samples, seconds of idle watched)
    let (flood, reps, idle_secs) = if quick {
        (300u64, 50usize, 1u64)
    } else if check {
        (5_000, 500, 3)
    } else {
        (20_000, 1000, 5)
    };
    // The last run repeats the one before: memory must not grow across runs (the first
    // runs raise the allocator's high-water mark; a leak would raise it again).
    // (subscriptions, percent of them whose filter lets the events through)
    let scales: &[(usize, usize)] = if quick {
        &[(1, 100), (10, 100), (10, 100)]
    } else if check {
        &[(1, 100), (100, 50), (1000, 10), (1000, 10)]
    } else {
        &[(1, 100), (10, 100), (100, 50), (1000, 10), (1000, 10)]
    };
    out.say(format!(
        "watchqd delivery benchmark ({}; {} cores; kernel {}; daemon {})",
        targets::run_kind(quick, check),
        std::thread::available_parallelism().map_or(0, usize::from),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        common::daemon_binary().display()
    ));

    let daemon = Daemon::with_config(
        "[limits]\nsubscriptions_per_connection = 100\nsubscriptions_per_uid = 2000\nwatches_per_uid = 2000\n\n[delivery]\nmax_queue_depth = 65536\n",
    );
    let pid = daemon.pid();
    // dbus-daemon, or dbus-broker with WATCHQD_TEST_BUS=dbus-broker: the process that
    // routes the signals, named as such in what is printed.
    let bus_pid = daemon.bus.pid();
    let bus = std::fs::read_to_string(format!("/proc/{bus_pid}/comm"))
        .map(|comm| comm.trim().to_owned())
        .unwrap_or_else(|_| "the bus".to_owned());
    out.say(format!(
        "bus: {bus} (WATCHQD_TEST_BUS chooses dbus-daemon or dbus-broker)"
    ));
    let me = std::process::id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = daemon.rss_kib();
    let switches = context_switches(pid);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_wakeups = (context_switches(pid) - switches) as f64 / idle_secs as f64;
    out.say(format!(
        "daemon idle: RSS {rss_idle} KiB, {idle_wakeups:.1} wakeups/s (no watches)"
    ));
    out.target("idle-wakeups", idle_wakeups, format!("over {idle_secs} s"));
    out.target("idle-rss", rss_idle as f64, "VmRSS".into());

    let disk = LoopDevice::attach(4);
    let deep = || HashMap::from([("queue-depth", Variant::from(65536u32))]);

    // One real DeviceChanged, whose body the raw emitter will send.
    let probe = Subscriber::with_options(&daemon, deep()).await;
    probe
        .watch("devices", 1, &[("name", Variant::from(disk.name.as_str()))])
        .await;
    let mut stream = signal_stream(&probe.conn).await;
    disk.synth_change();
    let sample = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = stream.next().await.unwrap().unwrap();
            if m.header().member().map(|m| m.as_str()) == Some("DeviceChanged") {
                return m;
            }
        }
    })
    .await
    .expect("a DeviceChanged for the sample");
    let body: watchqd::source::devices::signal::DeviceChanged =
        sample.body().deserialize().unwrap();
    let body_len = sample.data().len();
    out.say(format!(
        "signal size: {body_len} bytes (DeviceChanged of a loop device)"
    ));

    // Latency through watchqd, one event at a time, from just before the write that makes
    // the kernel emit the uevent (the file is opened beforehand, as for the flood).
    let mut lat_daemon = Vec::with_capacity(reps);
    {
        use std::io::Write;
        let mut uevent = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/sys/block/{}/uevent", disk.name))
            .unwrap();
        for _ in 0..reps {
            let start = Instant::now();
            uevent.write_all(b"change").unwrap();
            loop {
                let m = stream.next().await.unwrap().unwrap();
                if m.header().member().map(|m| m.as_str()) == Some("DeviceChanged") {
                    break;
                }
            }
            lat_daemon.push(start.elapsed());
        }
    }
    probe.proxy.close().await.unwrap();
    drop(probe);

    // The ceiling: a plain emitter, same bus, same body, unicast.
    let emitter = zbus::connection::Builder::address(daemon.address())
        .build()
        .await
        .unwrap();
    let receiver = watchqd::client::connect(Some(daemon.address()))
        .await
        .unwrap();
    let receiver_name = receiver.unique_name().unwrap().to_string();
    let mut lat_raw = Vec::with_capacity(reps);
    {
        let mut stream = signal_stream(&receiver).await;
        for _ in 0..reps {
            let start = Instant::now();
            emitter
                .emit_signal(
                    Some(receiver_name.as_str()),
                    "/bench",
                    "org.watchq1.Bench",
                    "DeviceChanged",
                    &body,
                )
                .await
                .unwrap();
            // The stream has every message of the connection: wait for the signal.
            loop {
                let m = stream.next().await.unwrap().unwrap();
                if m.header().member().map(|m| m.as_str()) == Some("DeviceChanged") {
                    break;
                }
            }
            lat_raw.push(start.elapsed());
        }
    }
    let (raw_rate, raw_cpu) = {
        let stream = signal_stream(&receiver).await;
        let counter = tokio::spawn(count_until(stream, flood, Arc::default()));
        let cpu_before = [cpu_ticks(pid), cpu_ticks(bus_pid), cpu_ticks(me)];
        let start = Instant::now();
        for _ in 0..flood {
            emitter
                .emit_signal(
                    Some(receiver_name.as_str()),
                    "/bench",
                    "org.watchq1.Bench",
                    "DeviceChanged",
                    &body,
                )
                .await
                .unwrap();
        }
        let end = counter.await.unwrap();
        let cpu_after = [cpu_ticks(pid), cpu_ticks(bus_pid), cpu_ticks(me)];
        (
            flood as f64 / (end - start).as_secs_f64(),
            cpu_split(cpu_before, cpu_after, flood),
        )
    };
    drop(receiver);
    drop(emitter);

    lat_daemon.sort();
    lat_raw.sort();
    let (d50, d99, r50, r99) = (
        percentile(&lat_daemon, 500),
        percentile(&lat_daemon, 990),
        percentile(&lat_raw, 500),
        percentile(&lat_raw, 990),
    );
    out.say(format!(
        "ceiling (raw zbus emitter -> 1 subscriber): {raw_rate:.0} signals/s; latency p50 {:.0} us, p99 {:.0} us; CPU per signal: {bus} {:.1} us, emitter+receiver {:.1} us",
        micros(r50),
        micros(r99),
        raw_cpu[1],
        raw_cpu[2]
    ));
    out.say(format!(
        "watchqd latency (kernel uevent -> subscriber): p50 {:.0} us, p99 {:.0} us",
        micros(d50),
        micros(d99)
    ));
    let added50 = micros(d50) - micros(r50);
    let added99 = micros(d99) - micros(r99);
    out.target(
        "added-p50",
        added50,
        format!("{:.0} us - {:.0} us", micros(d50), micros(r50)),
    );
    out.target(
        "added-p99",
        added99,
        format!("{:.0} us - {:.0} us", micros(d99), micros(r99)),
    );

    // Throughput through watchqd at several scales.
    let mut rss_after_runs = Vec::new();
    for &(subscriptions, percent) in scales {
        let receivers = (subscriptions * percent / 100).max(1);
        let connections = subscriptions.min(100);
        let mut conns = Vec::new();
        for _ in 0..connections {
            conns.push(
                watchqd::client::connect(Some(daemon.address()))
                    .await
                    .unwrap(),
            );
        }
        let mut subs = Vec::new();
        let mut per_conn_expected = vec![0u64; connections];
        let per_sub = flood
            .min(200_000 / receivers as u64)
            .max(if quick { 50 } else { 200 });
        for i in 0..subscriptions {
            let conn = conns[i % connections].clone();
            let sub = Subscriber::on(conn, deep()).await;
            sub.watch("devices", 1, &[("name", Variant::from(disk.name.as_str()))])
                .await;
            if i >= receivers {
                // Lets nothing of this test through: only additions pass.
                sub.proxy
                    .set_filter(&[("devices", &["add"][..])])
                    .await
                    .unwrap();
            } else {
                per_conn_expected[i % connections] += per_sub;
            }
            subs.push(sub);
        }
        let mut counters = Vec::new();
        // Per receiving connection: signals received so far, and its receivers.
        let mut progress = Vec::new();
        for (conn, expected) in conns.iter().zip(&per_conn_expected) {
            if *expected > 0 {
                let stream = signal_stream(conn).await;
                let received = Arc::new(AtomicU64::new(0));
                progress.push((Arc::clone(&received), expected / per_sub));
                counters.push(tokio::spawn(count_until(stream, *expected, received)));
            }
        }
        let slowest = || {
            progress
                .iter()
                .map(|(received, receivers_here)| received.load(Ordering::Relaxed) / receivers_here)
                .min()
                .unwrap_or(0)
        };
        let cpu_before = [cpu_ticks(pid), cpu_ticks(bus_pid), cpu_ticks(me)];
        let start = Instant::now();
        // Sustained throughput: the writer stays at most LAG events ahead of the slowest
        // delivery, as a steady producer would, so that queues (and memory) measure the
        // daemon rather than an arbitrary burst.
        const CHUNK: u64 = 500;
        const LAG: u64 = 2000;
        let receivers_u64 = receivers as u64;
        let mut written = 0;
        // (As a receiver that fell far behind raises the daemon's high-water mark, which
        // the allocator keeps, the RSS comparison between runs needs the bound per
        // receiver, not on the total.)
        while written < per_sub {
            let n = CHUNK.min(per_sub - written);
            let name = disk.name.clone();
            tokio::task::spawn_blocking(move || write_changes(&name, n))
                .await
                .unwrap();
            written += n;
            while slowest() + LAG < written {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let mut end = start;
        for counter in counters {
            end = end.max(counter.await.unwrap());
        }
        let elapsed = (end - start).as_secs_f64();
        let delivered = per_sub * receivers as u64;
        let rate = delivered as f64 / elapsed;
        let cpu = cpu_split(
            cpu_before,
            [cpu_ticks(pid), cpu_ticks(bus_pid), cpu_ticks(me)],
            delivered,
        );
        let rss = daemon.rss_kib();
        rss_after_runs.push(rss);
        // The same signals from a raw emitter to the same receivers, on the bus as it is
        // now (every subscription in place): what the bus itself manages at
        // this scale.
        let (bus_rate, bus_cpu) = {
            let emitter = zbus::connection::Builder::address(daemon.address())
                .build()
                .await
                .unwrap();
            let each = (20_000 / receivers_u64).clamp(50, 2000).min(per_sub);
            let mut names = Vec::new();
            let mut counters = Vec::new();
            for (conn, expected) in conns.iter().zip(&per_conn_expected) {
                if *expected > 0 {
                    let stream = signal_stream(conn).await;
                    let receivers_here = expected / per_sub;
                    names.push((conn.unique_name().unwrap().to_string(), receivers_here));
                    counters.push(tokio::spawn(count_until(
                        stream,
                        each * receivers_here,
                        Arc::default(),
                    )));
                }
            }
            let cpu_before = [cpu_ticks(pid), cpu_ticks(bus_pid), cpu_ticks(me)];
            let start = Instant::now();
            for _ in 0..each {
                for (name, receivers_here) in &names {
                    for _ in 0..*receivers_here {
                        emitter
                            .emit_signal(
                                Some(name.as_str()),
                                "/bench",
                                "org.watchq1.Subscription",
                                "DeviceChanged",
                                &body,
                            )
                            .await
                            .unwrap();
                    }
                }
            }
            let mut end = start;
            for counter in counters {
                end = end.max(counter.await.unwrap());
            }
            let sent = each * receivers_u64;
            let cpu_after = [cpu_ticks(pid), cpu_ticks(bus_pid), cpu_ticks(me)];
            (
                sent as f64 / (end - start).as_secs_f64(),
                cpu_split(cpu_before, cpu_after, sent),
            )
        };
        out.say(format!(
            "watchqd {subscriptions:>4} subscriptions ({receivers} let {per_sub} events through, the rest filtered): {rate:.0} signals/s = {:.2}x ceiling; CPU per delivered signal: watchqd {:.1} us, {bus} {:.1} us, writer+receivers {:.1} us; RSS after {rss} KiB",
            rate / raw_rate,
            cpu[0],
            cpu[1],
            cpu[2]
        ));
        out.say(format!(
            "     raw emitter to the same {receivers} receivers on this bus: {bus_rate:.0} signals/s (watchqd = {:.2}x of it); CPU per signal: {bus} {:.1} us, emitter+receivers {:.1} us",
            rate / bus_rate,
            bus_cpu[1],
            bus_cpu[2]
        ));
        // The scales with targets: one subscriber, and the first run at 1,000.
        let ids = match subscriptions {
            1 if rss_after_runs.len() == 1 => Some(("rate-1", "cpu-per-signal")),
            1000 if rss_after_runs.len() == scales.len() - 1 => {
                Some(("rate-1000", "cpu-per-signal-1000"))
            }
            _ => None,
        };
        if let Some((rate_id, cpu_id)) = ids {
            out.target(
                rate_id,
                rate / raw_rate,
                format!("{rate:.0}/s against {raw_rate:.0}/s"),
            );
            out.target(
                cpu_id,
                cpu[0] / cpu[1],
                format!("watchqd {:.1} us, {bus} {:.1} us", cpu[0], cpu[1]),
            );
        }
        for sub in &subs {
            sub.proxy.close().await.unwrap();
        }
        drop(subs);
        drop(conns);
    }
    let first = rss_after_runs[rss_after_runs.len() - 2];
    let last = *rss_after_runs.last().unwrap();
    out.target(
        "rss-growth",
        last as f64 - first as f64,
        format!("{first} KiB after the last run but one, {last} KiB after the same run again"),
    );
    // Direct delivery (SubscribeDirect), after the bus rows (whose CPU ratios a thousand
    // peer-to-peer connections just closed would cloud): the same events on a connection
    // of their own, against a raw zbus peer-to-peer emitter of the same body, held to issue 17's
    // targets (>= 2.0x the bus ceiling, >= 0.9x raw p2p, >= 1.0x at 1,000 subscriptions,
    // added p50 <= 50 us, p99 <= 500 us).
    let (p2p_rate, mut lat_p2p) = raw_p2p(&body, flood, reps).await;
    let (direct_rate, mut lat_direct, [direct_daemon_us, direct_me_us]) =
        direct_one(&daemon, &disk.name, flood, reps).await;
    lat_p2p.sort();
    lat_direct.sort();
    let (p50, p99) = (percentile(&lat_p2p, 500), percentile(&lat_p2p, 990));
    let (x50, x99) = (percentile(&lat_direct, 500), percentile(&lat_direct, 990));
    out.say(format!(
        "raw zbus peer-to-peer emitter -> 1 receiver: {p2p_rate:.0} signals/s = {:.2}x ceiling; latency p50 {:.0} us, p99 {:.0} us",
        p2p_rate / raw_rate,
        micros(p50),
        micros(p99)
    ));
    out.say(format!(
        "watchqd direct (SubscribeDirect) -> 1 subscriber: {direct_rate:.0} signals/s = {:.2}x ceiling, {:.2}x raw p2p; CPU per signal: watchqd {direct_daemon_us:.1} us, writer+receiver {direct_me_us:.1} us; latency p50 {:.0} us, p99 {:.0} us (added to raw p2p: p50 {:.0} us, p99 {:.0} us)",
        direct_rate / raw_rate,
        direct_rate / p2p_rate,
        micros(x50),
        micros(x99),
        micros(x50) - micros(p50),
        micros(x99) - micros(p99)
    ));

    // Many direct subscriptions with per-subscriber filters: the aggregate rate against
    // the bus ceiling of one subscriber (issue 17 asks >= 1.0x at 1,000).
    let (many, share) = if quick { (10, 50) } else { (1000, 10) };
    let receivers = (many * share / 100).max(1);
    let per_sub = flood.min(200_000 / receivers as u64);
    let many_rate = direct_many(&daemon, &disk.name, many, receivers, per_sub).await;
    out.say(format!(
        "watchqd direct {many} subscriptions ({receivers} let {per_sub} events through, the rest filtered): {many_rate:.0} signals/s aggregate = {:.2}x ceiling",
        many_rate / raw_rate
    ));
    out.target(
        "direct-rate-1",
        direct_rate / raw_rate,
        format!("{direct_rate:.0}/s against {raw_rate:.0}/s"),
    );
    out.target(
        "direct-vs-p2p",
        direct_rate / p2p_rate,
        format!("{direct_rate:.0}/s against {p2p_rate:.0}/s"),
    );
    out.target(
        "direct-rate-1000",
        many_rate / raw_rate,
        format!("{many_rate:.0}/s against {raw_rate:.0}/s"),
    );
    out.target(
        "direct-added-p50",
        micros(x50) - micros(p50),
        format!("{:.0} us - {:.0} us", micros(x50), micros(p50)),
    );
    out.target(
        "direct-added-p99",
        micros(x99) - micros(p99),
        format!("{:.0} us - {:.0} us", micros(x99), micros(p99)),
    );

    // Idle again, now with the device source running for a watch that sees no events:
    // the source and the delivery task sleep until the kernel or a client speaks. Not a
    // target: every uevent of the machine (another loop device, a USB port) wakes the
    // source to read and drop it, and shared test machines have plenty.
    let watcher = Subscriber::with_options(&daemon, deep()).await;
    watcher
        .watch("devices", 1, &[("name", Variant::from(disk.name.as_str()))])
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let switches = context_switches(pid);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let watching_wakeups = (context_switches(pid) - switches) as f64 / idle_secs as f64;
    out.say(format!(
        "daemon idle after the runs, one devices watch open: RSS {} KiB, {watching_wakeups:.1} wakeups/s (each uevent of the machine is one)",
        daemon.rss_kib()
    ));
    watcher.proxy.close().await.unwrap();
    if !out.quick {
        println!("\n(reproduce: cargo bench --bench delivery [-- --check])");
    }
    // Everything (daemon, bus, loop device) is dropped before the exit status is known.
    let ok = !check || out.verdicts.passed();
    drop((watcher, disk, daemon));
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
