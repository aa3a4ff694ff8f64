//! `bench-client report`: the markdown of `bench/RESULTS.md`, computed from the measurements
//! `bench/run.sh` collected, so no figure is ever typed by hand.
//!
//! Input: `--results FILE` with one `{"scenario", "target", "round", "data"}` object per line
//! (`data` is what `wrk`'s script, `bench-client` or the script itself printed), and `--meta FILE`
//! with `[[label, value], ...]` describing the machine and the run.

use std::fmt::Write as _;

use serde_json::Value;

use super::{BoxError, Opts};

const TARGETS: [&str; 3] = ["direct", "nginx", "sidekey"];

#[derive(Debug)]
struct Record {
    scenario: String,
    target: String,
    round: u64,
    data: Value,
}

#[derive(Debug)]
struct Results(Vec<Record>);

impl Results {
    fn load(path: &str) -> Result<Self, BoxError> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        let mut records = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| format!("{path}:{}: {e}", n + 1))?;
            records.push(Record {
                scenario: v["scenario"].as_str().unwrap_or_default().to_string(),
                target: v["target"].as_str().unwrap_or_default().to_string(),
                round: v["round"].as_u64().unwrap_or(0),
                data: v["data"].clone(),
            });
        }
        Ok(Self(records))
    }

    fn of<'a>(&'a self, scenario: &'a str, target: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
        self.0.iter().filter(move |r| r.scenario == scenario && r.target == target)
    }

    /// Every round's value at `pointer` (JSON pointer into `data`).
    fn values(&self, scenario: &str, target: &str, pointer: &str) -> Vec<f64> {
        self.of(scenario, target).filter_map(|r| r.data.pointer(pointer).and_then(Value::as_f64)).collect()
    }

    fn median(&self, scenario: &str, target: &str, pointer: &str) -> Option<f64> {
        median(self.values(scenario, target, pointer))
    }

    fn rounds(&self) -> u64 {
        self.0.iter().map(|r| r.round).max().unwrap_or(0)
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 })
}

/// What a row is judged against.
#[derive(Debug, Clone, Copy)]
enum Goal {
    None,
    /// sidekey / nginx at least this.
    RatioAtLeast(f64),
    /// sidekey - direct at most this (row units).
    OverheadAtMost(f64),
    /// sidekey / nginx at most this, and sidekey - direct at most that.
    RatioAndOverhead(f64, f64),
    /// sidekey's own figure at most this.
    AtMost(f64),
}

#[derive(Debug)]
struct Row {
    label: String,
    unit: &'static str,
    decimals: usize,
    values: [Option<f64>; 3],
    goal: Goal,
}

impl Row {
    fn new(label: impl Into<String>, unit: &'static str, decimals: usize, values: [Option<f64>; 3]) -> Self {
        Self { label: label.into(), unit, decimals, values, goal: Goal::None }
    }

    fn goal(mut self, goal: Goal) -> Self {
        self.goal = goal;
        self
    }

    fn ratio(&self) -> Option<f64> {
        match self.values {
            [_, Some(n), Some(s)] if n != 0.0 => Some(s / n),
            _ => None,
        }
    }

    fn overhead(&self) -> Option<f64> {
        match self.values {
            [Some(d), _, Some(s)] => Some(s - d),
            _ => None,
        }
    }

    fn fmt(&self, v: Option<f64>) -> String {
        match v {
            Some(v) => format!("{v:.*} {}", self.decimals, self.unit),
            None => "—".into(),
        }
    }

    fn fmt_overhead(&self) -> String {
        let Some(o) = self.overhead() else { return "—".into() };
        let mut s = format!("{o:+.*} {}", self.decimals, self.unit);
        if let [Some(d), _, _] = self.values {
            if self.unit == "req/s" && d != 0.0 {
                let _ = write!(s, " ({:+.1} %)", o / d * 100.0);
            }
        }
        s
    }

    fn judge(&self) -> (String, Option<bool>) {
        let u = self.unit;
        match self.goal {
            Goal::None => ("—".into(), None),
            Goal::RatioAtLeast(r) => (format!("≥ {r:.1} × nginx"), self.ratio().map(|x| x >= r)),
            Goal::OverheadAtMost(o) => (format!("≤ +{o} {u} over direct"), self.overhead().map(|x| x <= o)),
            Goal::RatioAndOverhead(r, o) => (
                format!("≤ {r:.1} × nginx, ≤ +{o} {u} over direct"),
                self.ratio().zip(self.overhead()).map(|(x, y)| x <= r && y <= o),
            ),
            Goal::AtMost(m) => (format!("≤ {m} {u}"), self.values[2].map(|x| x <= m)),
        }
    }
}

fn table(out: &mut String, rows: &[Row]) {
    out.push_str(
        "| scenario | direct | nginx | sidekey | sidekey / nginx | sidekey − direct | target | met? |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---|---|\n");
    for row in rows {
        let (goal, met) = row.judge();
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.label,
            row.fmt(row.values[0]),
            row.fmt(row.values[1]),
            row.fmt(row.values[2]),
            row.ratio().map_or("—".into(), |r| format!("{r:.2}")),
            row.fmt_overhead(),
            goal,
            met,
        );
    }
}

/// Medians for the three targets, scaled.
fn three(results: &Results, scenario: &str, pointer: &str, scale: f64) -> [Option<f64>; 3] {
    TARGETS.map(|t| results.median(scenario, t, pointer).map(|v| v * scale))
}

pub fn render(opts: &Opts) -> Result<String, BoxError> {
    let results = Results::load(opts.get("results").ok_or("--results is required")?)?;
    let meta: Value = match opts.get("meta") {
        Some(path) => serde_json::from_str(&std::fs::read_to_string(path)?)?,
        None => Value::Array(Vec::new()),
    };
    let ms = 1e-3; // the tools report microseconds
    let mib = 1.0 / 1024.0; // ... and KiB
    let meta_value = |key: &str| -> String {
        meta.as_array()
            .into_iter()
            .flatten()
            .find(|pair| pair[0] == key)
            .map(|pair| pair[1].as_str().map_or_else(|| pair[1].to_string(), str::to_string))
            .unwrap_or_else(|| "?".into())
    };
    let rate = meta_value("Fixed rate (req/s)");

    let mut rows = vec![
        Row::new(
            "(1) Throughput, 64 connections, 1 KB JSON in and out",
            "req/s",
            0,
            three(&results, "throughput", "/rps", 1.0),
        )
        .goal(Goal::RatioAtLeast(1.0)),
        Row::new(
            "(1) Latency p99 at that full load (wrk)",
            "ms",
            3,
            three(&results, "throughput", "/latency/p99_us", ms),
        ),
    ];
    for (name, pointer, goal) in [
        ("p50", "/latency/p50_us", Goal::OverheadAtMost(0.15)),
        ("p90", "/latency/p90_us", Goal::None),
        ("p99", "/latency/p99_us", Goal::RatioAndOverhead(1.0, 0.5)),
        ("p99.9", "/latency/p999_us", Goal::None),
    ] {
        rows.push(
            Row::new(
                format!("(2) Latency {name} at {rate} req/s, 16 connections"),
                "ms",
                3,
                three(&results, "latency", pointer, ms),
            )
            .goal(goal),
        );
    }
    for (name, pointer, goal) in [
        ("time to first chunk p50", "/ttfc/p50_us", Goal::None),
        ("time to first chunk p99", "/ttfc/p99_us", Goal::OverheadAtMost(1.0)),
        ("per-chunk delay p50", "/delay/p50_us", Goal::None),
        ("per-chunk delay p99", "/delay/p99_us", Goal::OverheadAtMost(1.0)),
        ("inter-chunk gap p99 (sent 10 ms apart)", "/gap/p99_us", Goal::None),
    ] {
        rows.push(
            Row::new(
                format!("(3) SSE, 100 streams × 100 chunks: {name}"),
                "ms",
                3,
                three(&results, "sse", pointer, ms),
            )
            .goal(goal),
        );
    }
    rows.extend([
        Row::new("(4) Idle RSS", "MiB", 1, three(&results, "idle_rss", "/kib", mib)).goal(Goal::AtMost(12.0)),
        Row::new("(4) RSS with 1,000 open streams", "MiB", 1, three(&results, "hold", "/rss_kib", mib))
            .goal(Goal::AtMost(64.0)),
        Row::new(
            "(4) RSS growth during a 100 MiB upload (chunked)",
            "MiB",
            1,
            three(&results, "upload", "/growth_kib", mib),
        )
        .goal(Goal::AtMost(9.0)),
        Row::new("(4) 100 MiB upload rate", "MiB/s", 0, three(&results, "upload", "/mib_per_s", 1.0)),
        Row::new(
            "(5) Startup to ready (instant IAM)",
            "ms",
            1,
            three(&results, "startup", "/median_ms", 1.0),
        ),
    ]);

    let mut out = String::new();
    out.push_str("# sidekey benchmark results\n\n");
    out.push_str(
        "Written by `bash bench/run.sh` from its own measurements (see `bench/README.md`); do not \
         edit by hand. Medians over the rounds; direct = the fake upstream with no proxy (the \
         floor), nginx = nginx as a reverse proxy setting a static `Authorization` (the \
         reference), sidekey = the release binary.\n\n",
    );
    let _ = writeln!(
        out,
        "**Machine: {} cores ({})**, {}. Rounds: {}.\n",
        meta_value("Cores (nproc)"),
        meta_value("CPU"),
        meta_value("Date"),
        results.rounds().max(1),
    );
    if meta_value("Warning") != "?" {
        let _ = writeln!(out, "> **Warning:** {}.\n", meta_value("Warning"));
    }
    table(&mut out, &rows);

    let mut met: Vec<bool> = rows.iter().filter_map(|r| r.judge().1).collect();
    met.extend(token_target(&results));
    let _ = writeln!(
        out,
        "\nTargets met: {} of {} (the table above and the token row of (6) below).",
        met.iter().filter(|m| **m).count(),
        met.len()
    );

    usage_cost(&mut out, &results);
    micro(&mut out, &results);
    checks(&mut out, &results);
    raw_rounds(&mut out, &results);

    out.push_str("\n## Run\n\n");
    for pair in meta.as_array().into_iter().flatten() {
        let value = pair[1].as_str().map_or_else(|| pair[1].to_string(), str::to_string);
        let _ = writeln!(out, "- {}: {}", pair[0].as_str().unwrap_or("?"), value);
    }
    Ok(out)
}

/// The token on the request path allocates nothing (0 allocations per call under DHAT).
fn token_target(results: &Results) -> Option<bool> {
    results
        .of("micro", "sidekey")
        .find(|r| r.data["name"] == "token_inject")
        .and_then(|r| r.data["allocs"].as_f64())
        .map(|a| a == 0.0)
}

/// The cost of token usage accounting: sidekey's throughput with `usage.scan = true` (the
/// default, the table's figure) against a second instance with it off, in the same rounds.
fn usage_cost(out: &mut String, results: &Results) {
    let on = results.median("throughput", "sidekey", "/rps");
    let off = results.median("throughput_noscan", "sidekey", "/rps");
    let (Some(on), Some(off)) = (on, off) else { return };
    let cost = (off - on) / off * 100.0;
    let _ = writeln!(
        out,
        "\n### Usage accounting cost\n\nThroughput (1) with `usage.scan = true` (default): {on:.0} req/s; \
         with `usage.scan = false`: {off:.0} req/s; cost {cost:.1} % (target < 5 %: {}).",
        if cost < 5.0 { "met" } else { "**not met**" }
    );
}

/// (6) the criterion figures and allocation counts.
fn micro(out: &mut String, results: &Results) {
    let records: Vec<&Record> = results.of("micro", "sidekey").collect();
    if records.is_empty() {
        return;
    }
    out.push_str("\n### (6) Per-request header work (criterion, `benches/request_path.rs`)\n\n");
    out.push_str(
        "| operation | median time | allocations per call | target | met? |\n|---|---:|---:|---|---|\n",
    );
    for r in records {
        let name = r.data["name"].as_str().unwrap_or("?");
        let ns = r.data["ns"].as_f64().map_or("—".into(), |v| format!("{v:.1} ns"));
        let allocs = r.data["allocs"].as_f64();
        let (goal, met) = match name {
            "token_inject" => ("no lock, no await, 0 allocations", allocs.map(|a| a == 0.0)),
            _ => ("—", None),
        };
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let allocs = allocs.map_or("—".into(), |a| format!("{a:.2}"));
        let _ = writeln!(out, "| `{name}` | {ns} | {allocs} | {goal} | {met} |");
    }
    out.push_str(
        "\n`uri_rewrite` = `strip_prefix` + `Target::join`; `prepare_request` = hop-by-hop, `Host` and \
         client `Authorization` removal on the 15 headers the OpenAI Python SDK sends; \
         `token_inject` = `TokenStore::current` (an `ArcSwap` load) + inserting \
         `token.header().clone()`; `all` = the three together. Allocations are counted with \
         valgrind's DHAT (the crate forbids `unsafe`, so no counting allocator), net of building \
         the header map hyper hands over. No lock and no await on the token path is by construction \
         (`TokenStore::current` is synchronous and reads an `ArcSwapOption`).\n",
    );
}

/// Every request the scenarios sent must have succeeded, or the figures mean little.
fn checks(out: &mut String, results: &Results) {
    out.push_str("\n## Checks\n\n");
    for target in TARGETS {
        let mut notes = Vec::new();
        let sum =
            |scenario: &str, pointer: &str| results.values(scenario, target, pointer).iter().sum::<f64>();
        let wrk_errors: f64 = ["connect", "read", "write", "status", "timeout"]
            .iter()
            .map(|k| sum("throughput", &format!("/errors/{k}")))
            .sum();
        let wrk_requests = sum("throughput", "/requests");
        if wrk_requests > 0.0 {
            notes.push(format!("throughput: {wrk_requests:.0} requests, {wrk_errors:.0} errors"));
        }
        let ok = sum("latency", "/ok");
        if ok > 0.0 {
            notes.push(format!(
                "fixed rate: {ok:.0} ok, {:.0} errors, {:.0} sends started > 2 ms late (client lag)",
                sum("latency", "/errors"),
                sum("latency", "/late_sends")
            ));
        }
        let streams = sum("sse", "/streams");
        if streams > 0.0 {
            let errors: usize =
                results.of("sse", target).map(|r| r.data["errors"].as_array().map_or(0, Vec::len)).sum();
            notes.push(format!(
                "SSE: {:.0} of {streams:.0} streams complete, {:.0} events, {errors} error messages",
                sum("sse", "/ok"),
                sum("sse", "/events")
            ));
        }
        for r in results.of("hold", target) {
            notes.push(format!("hold: {} streams open, {} failed", r.data["open"], r.data["failed"]));
        }
        for r in results.of("upload", target) {
            notes.push(format!(
                "upload: status {}, {} bytes arrived, RSS measured by {}",
                r.data["status"],
                r.data["echoed"],
                r.data["method"].as_str().unwrap_or("?")
            ));
        }
        if !notes.is_empty() {
            let _ = writeln!(out, "- {target}: {}", notes.join("; "));
        }
    }
}

/// Per-round values of the headline figures, to show the spread behind each median.
fn raw_rounds(out: &mut String, results: &Results) {
    out.push_str("\n## Rounds (each value is one round; the table shows their median)\n\n");
    for (label, scenario, pointer, scale, decimals) in [
        ("throughput (req/s)", "throughput", "/rps", 1.0, 0),
        ("fixed-rate p50 (ms)", "latency", "/latency/p50_us", 1e-3, 3),
        ("fixed-rate p99 (ms)", "latency", "/latency/p99_us", 1e-3, 3),
        ("SSE first chunk p99 (ms)", "sse", "/ttfc/p99_us", 1e-3, 3),
        ("SSE per-chunk delay p99 (ms)", "sse", "/delay/p99_us", 1e-3, 3),
    ] {
        let cells: Vec<String> = TARGETS
            .iter()
            .map(|t| {
                let v: Vec<String> = results
                    .values(scenario, t, pointer)
                    .iter()
                    .map(|x| format!("{:.*}", decimals, x * scale))
                    .collect();
                format!("{t} {}", v.join(", "))
            })
            .collect();
        let _ = writeln!(out, "- {label}: {}", cells.join("; "));
    }
}
