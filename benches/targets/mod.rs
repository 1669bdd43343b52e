//! Targets of the benchmarks that can enforce them (`-- --check`): each bench states
//! its own in one table, this holds them to their figures and gives the verdict.

/// What a run of a bench is, for its first line: the smoke run under `cargo test`, the
/// `--check` run, or the full one.
pub fn run_kind(quick: bool, check: bool) -> &'static str {
    if quick {
        "smoke run"
    } else if check {
        "check run"
    } else {
        "full run"
    }
}

/// Which side of its limit a figure must stay on.
#[derive(Clone, Copy)]
pub enum Bound {
    AtMost(f64),
    AtLeast(f64),
}

/// One target: what is measured, its limit, and, when it is knowingly missed today,
/// why (it is then printed as KNOWN-MISS and does not fail `--check`; met after all, it
/// is printed as MET, and the entry should go).
pub struct Target {
    pub id: &'static str,
    pub what: &'static str,
    pub bound: Bound,
    pub known_miss: Option<&'static str>,
}

/// The targets of one run: which were measured, which MISSED.
pub struct Verdicts {
    table: &'static [Target],
    /// The smoke run under `cargo test`: its sizes are too small for any figure to mean
    /// something, so no figure is held to its target (nor printed as MISSED).
    smoke: bool,
    measured: Vec<&'static str>,
    missed: Vec<&'static str>,
}

impl Verdicts {
    pub fn new(table: &'static [Target]) -> Verdicts {
        Verdicts {
            table,
            smoke: false,
            measured: Vec::new(),
            missed: Vec::new(),
        }
    }

    /// Marks the run as the smoke run (`quick`, see [`run_kind`]): every figure is then
    /// printed as SMOKE instead of MET, MISSED or KNOWN-MISS.
    pub fn smoke(mut self, quick: bool) -> Verdicts {
        self.smoke = quick;
        self
    }

    /// Holds `value` to the target `id`; returns the line that says how it went
    /// (`detail`: what the value is made of).
    pub fn target(&mut self, id: &'static str, value: f64, detail: &str) -> String {
        let target = self
            .table
            .iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("no target {id} in the table"));
        let (met, limit) = match target.bound {
            Bound::AtMost(limit) => (value <= limit, format!("<= {limit}")),
            Bound::AtLeast(limit) => (value >= limit, format!(">= {limit}")),
        };
        let verdict = match (met, target.known_miss) {
            _ if self.smoke => "SMOKE, a smoke run's figure is not held to it".to_owned(),
            (true, _) => "MET".to_owned(),
            (false, Some(why)) => format!("KNOWN-MISS, {why}"),
            (false, None) => {
                self.missed.push(id);
                "MISSED".to_owned()
            }
        };
        self.measured.push(id);
        format!(
            "  target {id}: {} {limit}: {verdict} ({value:.2}; {detail})",
            target.what
        )
    }

    /// `--check`'s verdict, printed: every target measured, none MISSED.
    pub fn passed(&self) -> bool {
        let unmeasured: Vec<&str> = self
            .table
            .iter()
            .map(|t| t.id)
            .filter(|id| !self.measured.contains(id))
            .collect();
        if !unmeasured.is_empty() {
            println!("check: FAILED: not measured: {}", unmeasured.join(", "));
        }
        if !self.missed.is_empty() {
            println!("check: FAILED: MISSED: {}", self.missed.join(", "));
        }
        let ok = unmeasured.is_empty() && self.missed.is_empty();
        if ok {
            println!("check: passed (every target MET or KNOWN-MISS)");
        }
        ok
    }
}
