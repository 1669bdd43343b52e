//! The real Prometheus tools the metrics are checked with: Debian's
//! `prometheus-node-exporter`, run on a loopback port with only its textfile collector
//! reading a directory, scraped over HTTP; and `promtool check metrics` (Debian's
//! `prometheus`). Both installed by `scripts/test`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TIMEOUT;

pub struct NodeExporter {
    child: Child,
    port: u16,
}

impl NodeExporter {
    /// Starts node_exporter with the textfile collector alone, reading `directory`, and
    /// waits until it answers.
    pub fn start(directory: &Path) -> NodeExporter {
        // A port the kernel just handed out and nobody holds.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let child = Command::new("prometheus-node-exporter")
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!(
                "--collector.textfile.directory={}",
                directory.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-node-exporter must be installed (scripts/test installs it)");
        let exporter = NodeExporter { child, port };
        let start = Instant::now();
        while exporter.try_scrape().is_err() {
            assert!(
                start.elapsed() < TIMEOUT,
                "node_exporter did not answer on 127.0.0.1:{port} within {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        exporter
    }

    fn try_scrape(&self) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        // HTTP/1.0: the server closes the connection after the answer, so reading to the
        // end reads exactly one response.
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP header end")
        })?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("answered {head}")));
        }
        Ok(body.to_owned())
    }

    /// `GET /metrics`: what Prometheus would store.
    pub fn scrape(&self) -> Metrics {
        let body = self
            .try_scrape()
            .unwrap_or_else(|e| panic!("scraping node_exporter failed: {e}"));
        Metrics::parse(&body)
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Samples of a scrape: (name, labels) → value.
#[derive(Debug, Default)]
pub struct Metrics {
    pub text: String,
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Metrics {
    /// Parses the text format's sample lines (label values here hold no `,` or `"`).
    pub fn parse(text: &str) -> Metrics {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            let value: f64 = value.parse().expect("a number");
            samples.insert((name.to_owned(), labels), value);
        }
        Metrics {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of the sample `name` whose labels include `labels`; `None` when there
    /// is none. Panics when several match: the caller must name one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} names {} series",
            found.len()
        );
        found.first().copied()
    }
}

/// `promtool check metrics` on `text`: its complaints, empty when it accepts it.
pub fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (Debian's prometheus; scripts/test installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}
