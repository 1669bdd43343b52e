//! What encoding an event costs the daemon: a record's signal body made once for every
//! subscriber, through its source's typed signal (`event_signal!`, `SignalKind::encode`),
//! against the hand-written borrowed tuple that encoded the same record before the
//! signals became types (the baseline, measured in the same run, alternating with it).
//!
//! The record is a loop device's `change` with the attributes and uevent properties the
//! devices source gives one (a device's signal is the largest and the most frequent).
//! Both sides include writing one subscriber's seq and tag into a copy of the body, as
//! delivery does. Each side runs in rounds of `ITERATIONS` encodings, alternating, and
//! the figure is the ratio of the medians of their per-encoding times, so that load
//! from the rest of the machine falls on both.
//!
//! Measured on a 2-core machine loaded by other builds: when the typed signal built an
//! owned struct (copying every attribute and property out of the record) the ratio was
//! 1.62 and 1.78; with the attributes alone copied, 1.28; borrowed, as now, 0.95 to 1.09.
//! `--check` exits non-zero when it is above [`TARGETS`]' limit, which a copy of the
//! attributes alone exceeds. Every other source's typed encoding is printed too, not held
//! to a target.
//!
//! `cargo bench --bench encoding [-- --check]`; under `cargo test` a short smoke run.

#[allow(dead_code)]
mod targets;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use targets::{Bound, Target, Verdicts};
use watchqd::bus::types::AttrMap;
use watchqd::event::{Attr, Audience, Change, Record};
use watchqd::source::CATALOGUE;

const TARGETS: &[Target] = &[Target {
    id: "typed-vs-tuple",
    what: "time to encode a device's signal, typed over the former borrowed tuple",
    bound: Bound::AtMost(1.2),
    known_miss: None,
}];

/// A loop device's `change`, as the devices source records it.
fn device_record() -> Record {
    let mut attributes = BTreeMap::new();
    for (key, value) in [
        ("name", "loop7"),
        ("devname", "/dev/loop7"),
        ("subsystem", "block"),
        ("devtype", "disk"),
        ("kernel-seqnum", "12345"),
        ("backing-file", "/var/tmp/watchq-bench.img"),
    ] {
        attributes.insert(key.to_owned(), Attr::from(value));
    }
    for (key, value) in [("major", 7), ("minor", 7), ("size", 8_388_608)] {
        attributes.insert(key.to_owned(), Attr::U64(value));
    }
    for (key, value) in [("removable", false), ("read-only", false)] {
        attributes.insert(key.to_owned(), Attr::Bool(value));
    }
    let properties = [
        ("ACTION", "change"),
        ("DEVPATH", "/devices/virtual/block/loop7"),
        ("SUBSYSTEM", "block"),
        ("DEVNAME", "loop7"),
        ("DEVTYPE", "disk"),
        ("DISKSEQ", "42"),
        ("SEQNUM", "12345"),
        ("MAJOR", "7"),
        ("MINOR", "7"),
        ("SYNTH_UUID", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    Record {
        source: watchqd::source::devices::NAME,
        subtype: 2,
        object_id: "/devices/virtual/block/loop7".into(),
        change: Change::Upsert,
        attributes,
        properties,
        audience: Audience::Everyone,
    }
}

/// The encoding before the signals became types: a tuple borrowing from the record.
fn former(record: &Record) -> Vec<u8> {
    let context = zbus::wire::serialized::Context::new(zbus::wire::NATIVE_ENDIAN, 0);
    let data = zbus::wire::to_bytes(
        context,
        &(
            0u64,
            0u64,
            "change",
            record.attr_str("subsystem").unwrap_or_default(),
            record.object_id.as_str(),
            AttrMap(&record.attributes),
            &record.properties,
        ),
    )
    .expect("the former encoding");
    let mut body = data.bytes().to_vec();
    body[..8].copy_from_slice(&1u64.to_ne_bytes());
    body[8..16].copy_from_slice(&2u64.to_ne_bytes());
    body
}

fn typed(record: &Record) -> Vec<u8> {
    watchqd::source::devices::signal::KIND
        .encode(record)
        .expect("the typed encoding")
        .body_for(1, 2)
}

/// Nanoseconds per call of `f`, over `iterations` calls.
fn per_call(iterations: u32, mut f: impl FnMut() -> usize) -> f64 {
    let start = Instant::now();
    let mut bytes = 0;
    for _ in 0..iterations {
        bytes += black_box(f());
    }
    black_box(bytes);
    start.elapsed().as_secs_f64() * 1e9 / f64::from(iterations)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let quick = !args.iter().any(|a| a == "--bench");
    let check = args.iter().any(|a| a == "--check");
    let (rounds, iterations) = if quick { (3, 200) } else { (31, 20_000) };
    println!(
        "encoding bench ({}): {rounds} alternating rounds of {iterations} encodings",
        targets::run_kind(quick, check)
    );
    let record = device_record();
    assert_eq!(
        former(&record),
        typed(&record),
        "both sides must make the same bytes"
    );
    println!(
        "signal size: {} bytes (DeviceChanged)",
        typed(&record).len()
    );
    let (mut old, mut new) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        old.push(per_call(iterations, || former(&record).len()));
        new.push(per_call(iterations, || typed(&record).len()));
    }
    let (old, new) = (median(old), median(new));
    println!("DeviceChanged: typed {new:.0} ns, former tuple {old:.0} ns per encoding");
    for source in CATALOGUE.iter() {
        let record = Record {
            source: source.name,
            ..device_record()
        };
        let cost = median(
            (0..rounds)
                .map(|_| {
                    per_call(iterations, || {
                        source
                            .signal
                            .encode(&record)
                            .map_or(0, |e| e.body_for(1, 2).len())
                    })
                })
                .collect(),
        );
        println!(
            "  {:<16} {cost:>6.0} ns per encoding (the device's record)",
            source.signal.member
        );
    }
    let mut verdicts = Verdicts::new(TARGETS).smoke(quick);
    println!(
        "{}",
        verdicts.target(
            "typed-vs-tuple",
            new / old,
            &format!("{new:.0} ns against {old:.0} ns")
        )
    );
    println!("(reproduce: cargo bench --bench encoding [-- --check])");
    if check && !quick && !verdicts.passed() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
