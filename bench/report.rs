//! `bench-client report`: the markdown of `bench/RESULTS.md`, computed from the measurements
//! `bench/run.sh` collected, so no figure is ever typed by hand; with `--readme`, the summary
//! table `bench/run.sh` puts into the README's performance section, from the same measurements.
//!
//! Input: `--results FILE` with one `{"scenario", "target", "round", "data"}` object per line
//! (`data` is what `wrk`'s script, `bench-client` or the script itself printed), and `--meta FILE`
//! with `[[label, value], ...]` describing the machine and the run.

use std::fmt::Write as _;

use serde_json::Value;

use super::{BoxError, Opts};

/// Every target a scenario may have, in the order the Checks and Rounds sections list them.
const ALL_TARGETS: [&str; 9] = [
    "direct",
    "nginx",
    "sidekey",
    "sidekey_h2",
    "floor",
    "floor_h2",
    "sidekey_noscan",
    "sidekey_clients",
    "sidekey_signed",
];

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

    fn has(&self, scenario: &str) -> bool {
        self.0.iter().any(|r| r.scenario == scenario)
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

/// What a row is judged against (for each judged column).
#[derive(Debug, Clone, Copy)]
enum Goal {
    None,
    /// the judged figure / nginx at least this.
    RatioAtLeast(f64),
    /// the judged figure / nginx at most this.
    RatioAtMost(f64),
    /// the judged figure - direct at most this (row units).
    OverheadAtMost(f64),
    /// the judged figure / nginx at most this, and minus direct at most that.
    RatioAndOverhead(f64, f64),
    /// the judged figure itself at most this.
    AtMost(f64),
}

/// A table's columns: the targets whose medians it shows, which of them are judged against the
/// goals (sidekey, in one or two configurations), and whether the "− direct" column is shown.
#[derive(Debug)]
struct Layout {
    /// (target in the results, column header, informational: dropped when it has no value).
    columns: Vec<(&'static str, &'static str, bool)>,
    /// (column index, short name in the derived columns' headers).
    judged: Vec<(usize, &'static str)>,
    overhead: bool,
}

const DIRECT: usize = 0;
const NGINX: usize = 1;

impl Layout {
    fn plain() -> Self {
        Self {
            columns: vec![
                ("direct", "direct", false),
                ("nginx", "nginx", false),
                ("sidekey", "sidekey", false),
                ("floor", "hyper floor", true),
            ],
            judged: vec![(2, "sidekey")],
            overhead: true,
        }
    }

    fn tls() -> Self {
        Self {
            columns: vec![
                ("direct", "direct (TLS)", false),
                ("nginx", "nginx (h1 upstream)", false),
                ("sidekey", "sidekey h1", false),
                ("sidekey_h2", "sidekey h2", false),
                ("floor", "hyper floor h1", true),
                ("floor_h2", "hyper floor h2", true),
            ],
            judged: vec![(2, "h1"), (3, "h2")],
            overhead: false,
        }
    }

    /// Medians of every column's target in `scenario`, scaled.
    fn values(&self, results: &Results, scenario: &str, pointer: &str, scale: f64) -> Vec<Option<f64>> {
        self.columns.iter().map(|(t, _, _)| results.median(scenario, t, pointer).map(|v| v * scale)).collect()
    }
}

#[derive(Debug)]
struct Row {
    label: String,
    unit: &'static str,
    decimals: usize,
    values: Vec<Option<f64>>,
    goal: Goal,
}

impl Row {
    fn new(label: impl Into<String>, unit: &'static str, decimals: usize, values: Vec<Option<f64>>) -> Self {
        Self { label: label.into(), unit, decimals, values, goal: Goal::None }
    }

    fn goal(mut self, goal: Goal) -> Self {
        self.goal = goal;
        self
    }

    fn value(&self, i: usize) -> Option<f64> {
        self.values.get(i).copied().flatten()
    }

    fn ratio(&self, i: usize) -> Option<f64> {
        match (self.value(i), self.value(NGINX)) {
            (Some(s), Some(n)) if n != 0.0 => Some(s / n),
            _ => None,
        }
    }

    fn overhead(&self, i: usize) -> Option<f64> {
        Some(self.value(i)? - self.value(DIRECT)?)
    }

    fn fmt(&self, v: Option<f64>) -> String {
        match v {
            Some(v) => format!("{v:.*} {}", self.decimals, self.unit),
            None => "—".into(),
        }
    }

    fn fmt_overhead(&self, i: usize) -> String {
        let Some(o) = self.overhead(i) else { return "—".into() };
        let mut s = format!("{o:+.*} {}", self.decimals, self.unit);
        if let Some(d) = self.value(DIRECT) {
            if self.unit == "req/s" && d != 0.0 {
                let _ = write!(s, " ({:+.1} %)", o / d * 100.0);
            }
        }
        s
    }

    /// The goal's text, and whether column `i` meets it (`None`: no goal, or no figure).
    fn judge(&self, i: usize) -> (String, Option<bool>) {
        let u = self.unit;
        match self.goal {
            Goal::None => ("—".into(), None),
            Goal::RatioAtLeast(r) => (format!("≥ {r:.1} × nginx"), self.ratio(i).map(|x| x >= r)),
            Goal::RatioAtMost(r) => (format!("≤ {r:.1} × nginx"), self.ratio(i).map(|x| x <= r)),
            Goal::OverheadAtMost(o) => (format!("≤ +{o} {u} over direct"), self.overhead(i).map(|x| x <= o)),
            Goal::RatioAndOverhead(r, o) => (
                format!("≤ {r:.1} × nginx, ≤ +{o} {u} over direct"),
                self.ratio(i).zip(self.overhead(i)).map(|(x, y)| x <= r && y <= o),
            ),
            Goal::AtMost(m) => (format!("≤ {m} {u}"), self.value(i).map(|x| x <= m)),
        }
    }
}

fn met_text(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "—",
    }
}

/// Renders the table; returns every judgement it made (for the "Targets met" count).
fn table(out: &mut String, layout: &Layout, rows: &[Row]) -> Vec<bool> {
    let shown: Vec<usize> = (0..layout.columns.len())
        .filter(|&c| !layout.columns[c].2 || rows.iter().any(|r| r.value(c).is_some()))
        .collect();
    let mut header = String::from("| scenario |");
    let mut align = String::from("|---|");
    for &c in &shown {
        let _ = write!(header, " {} |", layout.columns[c].1);
        align.push_str("---:|");
    }
    for (_, name) in &layout.judged {
        let _ = write!(header, " {name} / nginx |");
        align.push_str("---:|");
        if layout.overhead {
            let _ = write!(header, " {name} − direct |");
            align.push_str("---:|");
        }
    }
    header.push_str(" target |");
    align.push_str("---|");
    for (_, name) in &layout.judged {
        if layout.judged.len() == 1 {
            header.push_str(" met? |");
        } else {
            let _ = write!(header, " met? ({name}) |");
        }
        align.push_str("---|");
    }
    let _ = writeln!(out, "{header}\n{align}");
    let mut judgements = Vec::new();
    for row in rows {
        let mut line = format!("| {} |", row.label);
        for &c in &shown {
            let _ = write!(line, " {} |", row.fmt(row.value(c)));
        }
        for &(i, _) in &layout.judged {
            let _ = write!(line, " {} |", row.ratio(i).map_or("—".into(), |r| format!("{r:.2}")));
            if layout.overhead {
                let _ = write!(line, " {} |", row.fmt_overhead(i));
            }
        }
        let _ = write!(line, " {} |", row.judge(layout.judged[0].0).0);
        for &(i, _) in &layout.judged {
            let met = row.judge(i).1;
            judgements.extend(met);
            let _ = write!(line, " {} |", met_text(met));
        }
        let _ = writeln!(out, "{line}");
    }
    judgements
}

const MS: f64 = 1e-3; // the tools report microseconds
const MIB: f64 = 1.0 / 1024.0; // ... and KiB

fn plain_rows(results: &Results, rate: &str) -> Vec<Row> {
    let l = Layout::plain();
    let v = |scenario: &str, pointer: &str, scale: f64| l.values(results, scenario, pointer, scale);
    let mut rows = vec![
        Row::new(
            "(1) Throughput, 64 connections, 1 KB JSON in and out",
            "req/s",
            0,
            v("throughput", "/rps", 1.0),
        )
        .goal(Goal::RatioAtLeast(1.0)),
        Row::new("(1) Latency p99 at that full load (wrk)", "ms", 3, v("throughput", "/latency/p99_us", MS)),
        Row::new(
            "(1) CPU per request, proxy process(es)",
            "µs",
            1,
            v("throughput", "/cpu/proxy_us_per_req", 1.0),
        )
        .goal(Goal::RatioAtMost(1.0)),
        Row::new(
            "(1) CPU per request, the upstream nginx (context)",
            "µs",
            1,
            v("throughput", "/cpu/origin_us_per_req", 1.0),
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
                v("latency", pointer, MS),
            )
            .goal(goal),
        );
    }
    for (name, pointer) in [("p50", "/latency/p50_us"), ("p99", "/latency/p99_us")] {
        rows.push(Row::new(
            format!("(2) Latency {name} at one connection, one request at a time"),
            "ms",
            3,
            v("serial", pointer, MS),
        ));
    }
    for (name, pointer, goal) in [
        ("time to first chunk p50", "/ttfc/p50_us", Goal::None),
        ("time to first chunk p99", "/ttfc/p99_us", Goal::OverheadAtMost(1.0)),
        ("per-chunk delay p50", "/delay/p50_us", Goal::None),
        ("per-chunk delay p99", "/delay/p99_us", Goal::OverheadAtMost(1.0)),
        ("inter-chunk gap p99 (sent 10 ms apart)", "/gap/p99_us", Goal::None),
    ] {
        rows.push(
            Row::new(format!("(3) SSE, 100 streams × 100 chunks: {name}"), "ms", 3, v("sse", pointer, MS))
                .goal(goal),
        );
    }
    rows.extend([
        Row::new("(4) Idle RSS", "MiB", 1, v("idle_rss", "/kib", MIB)).goal(Goal::AtMost(12.0)),
        Row::new("(4) RSS with 1,000 open streams", "MiB", 1, v("hold", "/rss_kib", MIB))
            .goal(Goal::AtMost(64.0)),
        Row::new(
            "(4) RSS growth during a 100 MiB upload (chunked)",
            "MiB",
            1,
            v("upload", "/growth_kib", MIB),
        )
        .goal(Goal::AtMost(9.0)),
        Row::new("(4) 100 MiB upload rate", "MiB/s", 0, v("upload", "/mib_per_s", 1.0)),
        Row::new("(5) Startup to ready (instant IAM)", "ms", 1, v("startup", "/median_ms", 1.0)),
    ]);
    rows
}

fn tls_rows(results: &Results, rate: &str) -> Vec<Row> {
    let l = Layout::tls();
    let v = |scenario: &str, pointer: &str, scale: f64| l.values(results, scenario, pointer, scale);
    let mut rows = vec![
        Row::new("(7) Throughput, 64 connections", "req/s", 0, v("tls_throughput", "/rps", 1.0))
            .goal(Goal::RatioAtLeast(1.0)),
        Row::new(
            "(7) Latency p99 at that full load (wrk)",
            "ms",
            3,
            v("tls_throughput", "/latency/p99_us", MS),
        ),
        Row::new(
            "(7) CPU per request, proxy process(es)",
            "µs",
            1,
            v("tls_throughput", "/cpu/proxy_us_per_req", 1.0),
        )
        .goal(Goal::RatioAtMost(1.0)),
        Row::new(
            "(7) CPU per request, the upstream nginx (context)",
            "µs",
            1,
            v("tls_throughput", "/cpu/origin_us_per_req", 1.0),
        ),
    ];
    for (name, pointer, goal) in [
        ("p50", "/latency/p50_us", Goal::None),
        ("p99", "/latency/p99_us", Goal::RatioAtMost(1.0)),
        ("p99.9", "/latency/p999_us", Goal::None),
    ] {
        rows.push(
            Row::new(
                format!("(7) Latency {name} at {rate} req/s, 16 connections"),
                "ms",
                3,
                v("tls_latency", pointer, MS),
            )
            .goal(goal),
        );
    }
    for (name, pointer) in [("p50", "/latency/p50_us"), ("p99", "/latency/p99_us")] {
        rows.push(Row::new(
            format!("(7) Latency {name} at one connection, one request at a time"),
            "ms",
            3,
            v("tls_serial", pointer, MS),
        ));
    }
    for (name, pointer) in [
        ("time to first chunk p50", "/ttfc/p50_us"),
        ("time to first chunk p99", "/ttfc/p99_us"),
        ("per-chunk delay p50", "/delay/p50_us"),
        ("per-chunk delay p99", "/delay/p99_us"),
    ] {
        rows.push(Row::new(
            format!("(7) SSE, 100 streams × 100 chunks: {name}"),
            "ms",
            3,
            v("tls_sse", pointer, MS),
        ));
    }
    rows
}

struct Meta(Value);

impl Meta {
    fn get(&self, key: &str) -> String {
        self.0
            .as_array()
            .into_iter()
            .flatten()
            .find(|pair| pair[0] == key)
            .map(|pair| pair[1].as_str().map_or_else(|| pair[1].to_string(), str::to_string))
            .unwrap_or_else(|| "?".into())
    }
}

pub fn render(opts: &Opts) -> Result<String, BoxError> {
    let results = Results::load(opts.get("results").ok_or("--results is required")?)?;
    let meta = Meta(match opts.get("meta") {
        Some(path) => serde_json::from_str(&std::fs::read_to_string(path)?)?,
        None => Value::Array(Vec::new()),
    });
    if opts.switch("--readme") {
        return Ok(readme(&results, &meta));
    }
    let rate = meta.get("Fixed rate (req/s)");
    let mut out = String::new();
    out.push_str("# sidekey benchmark results\n\n");
    out.push_str(
        "Written by `bash bench/run.sh` from its own measurements (see `bench/README.md`); do not \
         edit by hand. Medians over the rounds; direct = the fake upstream with no proxy (the \
         floor), nginx = nginx as a reverse proxy setting a static `Authorization` (the \
         reference), sidekey = the release binary, hyper floor = `bench/floor.rs`, a minimal \
         hyper proxy (one thread per core, informational: no target).\n\n",
    );
    let _ = writeln!(
        out,
        "**Machine: {} cores ({})**, {}. Rounds: {}.\n",
        meta.get("Cores (nproc)"),
        meta.get("CPU"),
        meta.get("Date"),
        results.rounds().max(1),
    );
    if meta.get("Warning") != "?" {
        let _ = writeln!(out, "> **Warning:** {}.\n", meta.get("Warning"));
    }
    out.push_str("## Plain-HTTP upstream\n\n");
    let mut met = table(&mut out, &Layout::plain(), &plain_rows(&results, &rate));
    if results.has("tls_throughput") {
        out.push_str(
            "\n## HTTPS upstream (7)\n\nThe client → proxy leg stays plain HTTP on loopback (the \
             sidecar's case); the proxy → upstream leg is TLS with the run's throw-away CA. \
             direct (TLS) = the client itself speaking HTTPS (HTTP/1.1) to the upstream. nginx \
             speaks HTTP/1.1 to upstreams (it has no HTTP/2 proxying); sidekey h1 has \
             `upstream.http2 = false`, sidekey h2 the default (`h2` offered by ALPN). Targets are \
             judged for both sidekey configurations.\n\n",
        );
        met.extend(table(&mut out, &Layout::tls(), &tls_rows(&results, &rate)));
        protocols(&mut out, &results);
    }
    met.extend(token_target(&results));
    let _ = writeln!(
        out,
        "\nTargets met: {} of {} (the tables above and the token row of (6) below).",
        met.iter().filter(|m| **m).count(),
        met.len()
    );

    usage_cost(&mut out, &results);
    auth_cost(&mut out, &results);
    micro(&mut out, &results);
    checks(&mut out, &results);
    raw_rounds(&mut out, &results);

    out.push_str("\n## Run\n\n");
    for pair in meta.0.as_array().into_iter().flatten() {
        let value = pair[1].as_str().map_or_else(|| pair[1].to_string(), str::to_string);
        let _ = writeln!(out, "- {}: {}", pair[0].as_str().unwrap_or("?"), value);
    }
    Ok(out)
}

/// What the TLS origins answered on `/v1/sanity/proto` through each path, before the measurements.
fn protocols(out: &mut String, results: &Results) {
    let records: Vec<&Record> = results.0.iter().filter(|r| r.scenario == "tls_proto").collect();
    if records.is_empty() {
        return;
    }
    out.push_str(
        "\nThe protocol each path really speaks to the upstream, as the upstream saw it (checked \
         before measuring; JSON: the upstream nginx's `$server_protocol $ssl_protocol $ssl_cipher`, \
         SSE: `bench-upstream`'s HTTP version):\n\n",
    );
    for r in records {
        let field = |k: &str| r.data[k].as_str().unwrap_or("—").trim().to_string();
        let _ = writeln!(out, "- {}: JSON {}; SSE {}", r.target, field("json"), field("sse"));
    }
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
    let off = results.median("throughput", "sidekey_noscan", "/rps");
    let (Some(on), Some(off)) = (on, off) else { return };
    let cost = (off - on) / off * 100.0;
    let _ = writeln!(
        out,
        "\n### Usage accounting cost\n\nThroughput (1) with `usage.scan = true` (default): {on:.0} req/s; \
         with `usage.scan = false`: {off:.0} req/s; cost {cost:.1} % (target < 5 %: {}).",
        if cost < 5.0 { "met" } else { "**not met**" }
    );
}

/// Client authentication priced in throughput and CPU per request: plain sidekey (no client
/// auth) against an instance with one `[[clients]]` key and one with `[signed_keys]` (HS256).
fn auth_cost(out: &mut String, results: &Results) {
    let rps = |t: &str| results.median("throughput", t, "/rps");
    let cpu = |t: &str| results.median("throughput", t, "/cpu/proxy_us_per_req");
    let (Some(base), base_cpu) = (rps("sidekey"), cpu("sidekey")) else { return };
    if rps("sidekey_clients").is_none() && rps("sidekey_signed").is_none() {
        return;
    }
    out.push_str(
        "\n### Client authentication cost (throughput (1), same rounds)\n\n\
         | sidekey | throughput | vs no client auth | CPU per request | vs no client auth |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for (t, label) in [
        ("sidekey", "no client auth (the table's sidekey)"),
        ("sidekey_clients", "one `[[clients]]` key (SHA-256 lookup per request)"),
        ("sidekey_signed", "`[signed_keys]` HS256 (a JWT check per request)"),
    ] {
        let Some(r) = rps(t) else { continue };
        let c = cpu(t);
        let delta =
            if t == "sidekey" { "—".into() } else { format!("{:+.1} %", (r - base) / base * 100.0) };
        let cdelta = match (c, base_cpu) {
            (Some(c), Some(b)) if t != "sidekey" => format!("{:+.1} µs", c - b),
            _ => "—".into(),
        };
        let c = c.map_or("—".into(), |c| format!("{c:.1} µs"));
        let _ = writeln!(out, "| {label} | {r:.0} req/s | {delta} | {c} | {cdelta} |");
    }
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
        let allocs = allocs.map_or("—".into(), |a| format!("{a:.2}"));
        let _ = writeln!(out, "| `{name}` | {ns} | {allocs} | {goal} | {} |", met_text(met));
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
    let caller: Vec<&Record> = results.of("micro_caller", "sidekey").collect();
    if caller.is_empty() {
        return;
    }
    out.push_str(
        "\n### (6) The caller path (criterion, `benches/request_path.rs`, group `caller_path`)\n\n\
         | operation | median time | allocations per call |\n|---|---:|---:|\n",
    );
    for r in caller {
        let name = r.data["name"].as_str().unwrap_or("?");
        let ns = r.data["ns"].as_f64().map_or("—".into(), |v| format!("{v:.1} ns"));
        let allocs = r.data["allocs"].as_f64().map_or("—".into(), |a| format!("{a:.2}"));
        let _ = writeln!(out, "| `{name}` | {ns} | {allocs} |");
    }
    out.push_str(
        "\n`client_key_1` / `client_key_100` = `ClientTable::lookup` of a key among 1 / 100 clients \
         (a SHA-256 of the key, then a constant-time comparison with every digest); `route_5` = \
         `RouteTable::lookup` among 5 routes (the matching one tried last); `signed_verify` = \
         `Verifier::verify` of an HS256 signed key; `resolve_open` = the whole `Resolver::resolve` \
         decision without client authentication; `resolve_client` / `resolve_signed` = the same with \
         100 clients, 5 routes and signed keys on, for a client key / a signed key. The throughput \
         price of the same work is in *Client authentication cost* above.\n",
    );
}

/// Every request the scenarios sent must have succeeded, or the figures mean little.
fn checks(out: &mut String, results: &Results) {
    out.push_str("\n## Checks\n\n");
    let mut failures = 0.0;
    let mut lines = Vec::new();
    for target in ALL_TARGETS {
        let mut notes = Vec::new();
        let sum =
            |scenario: &str, pointer: &str| results.values(scenario, target, pointer).iter().sum::<f64>();
        for (prefix, tput, lat, serial, sse) in [
            ("", "throughput", "latency", "serial", "sse"),
            ("TLS ", "tls_throughput", "tls_latency", "tls_serial", "tls_sse"),
        ] {
            let wrk_errors: f64 = ["connect", "read", "write", "status", "timeout"]
                .iter()
                .map(|k| sum(tput, &format!("/errors/{k}")))
                .sum();
            let wrk_requests = sum(tput, "/requests");
            if wrk_requests > 0.0 {
                failures += wrk_errors;
                notes.push(format!("{prefix}throughput: {wrk_requests:.0} requests, {wrk_errors:.0} errors"));
            }
            let ok = sum(lat, "/ok");
            if ok > 0.0 {
                failures += sum(lat, "/errors");
                notes.push(format!(
                    "{prefix}fixed rate: {ok:.0} ok, {:.0} errors, {:.0} sends started > 2 ms late (client lag)",
                    sum(lat, "/errors"),
                    sum(lat, "/late_sends")
                ));
            }
            let ok = sum(serial, "/ok");
            if ok > 0.0 {
                failures += sum(serial, "/errors");
                notes.push(format!(
                    "{prefix}one connection: {ok:.0} ok, {:.0} errors",
                    sum(serial, "/errors")
                ));
            }
            let streams = sum(sse, "/streams");
            if streams > 0.0 {
                let errors: usize =
                    results.of(sse, target).map(|r| r.data["errors"].as_array().map_or(0, Vec::len)).sum();
                failures += streams - sum(sse, "/ok");
                notes.push(format!(
                    "{prefix}SSE: {:.0} of {streams:.0} streams complete, {:.0} events, {errors} error messages",
                    sum(sse, "/ok"),
                    sum(sse, "/events")
                ));
            }
        }
        for r in results.of("hold", target) {
            failures += r.data["failed"].as_f64().unwrap_or(0.0);
            notes.push(format!("hold: {} streams open, {} failed", r.data["open"], r.data["failed"]));
        }
        for r in results.of("upload", target) {
            if r.data["status"] != 200 || r.data["echoed"] != r.data["bytes"] {
                failures += 1.0;
            }
            notes.push(format!(
                "upload: status {}, {} bytes arrived, RSS measured by {}",
                r.data["status"],
                r.data["echoed"],
                r.data["method"].as_str().unwrap_or("?")
            ));
        }
        if !notes.is_empty() {
            lines.push(format!("- {target}: {}", notes.join("; ")));
        }
    }
    if failures == 0.0 {
        out.push_str("Every request succeeded.\n\n");
    } else {
        let _ = writeln!(out, "**Not every request succeeded: {failures:.0} failed** (see below).\n");
    }
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
}

/// Per-round values of the headline figures, to show the spread behind each median.
fn raw_rounds(out: &mut String, results: &Results) {
    out.push_str("\n## Rounds (each value is one round; the table shows their median)\n\n");
    for (label, scenario, pointer, scale, decimals) in [
        ("throughput (req/s)", "throughput", "/rps", 1.0, 0),
        ("CPU per request (µs)", "throughput", "/cpu/proxy_us_per_req", 1.0, 1),
        ("fixed-rate p50 (ms)", "latency", "/latency/p50_us", 1e-3, 3),
        ("fixed-rate p99 (ms)", "latency", "/latency/p99_us", 1e-3, 3),
        ("one connection p50 (ms)", "serial", "/latency/p50_us", 1e-3, 3),
        ("SSE first chunk p99 (ms)", "sse", "/ttfc/p99_us", 1e-3, 3),
        ("SSE per-chunk delay p99 (ms)", "sse", "/delay/p99_us", 1e-3, 3),
        ("TLS throughput (req/s)", "tls_throughput", "/rps", 1.0, 0),
        ("TLS CPU per request (µs)", "tls_throughput", "/cpu/proxy_us_per_req", 1.0, 1),
        ("TLS fixed-rate p99 (ms)", "tls_latency", "/latency/p99_us", 1e-3, 3),
        ("TLS one connection p50 (ms)", "tls_serial", "/latency/p50_us", 1e-3, 3),
        ("TLS SSE per-chunk delay p99 (ms)", "tls_sse", "/delay/p99_us", 1e-3, 3),
    ] {
        let cells: Vec<String> = ALL_TARGETS
            .iter()
            .filter_map(|t| {
                let v: Vec<String> = results
                    .values(scenario, t, pointer)
                    .iter()
                    .map(|x| format!("{:.*}", decimals, x * scale))
                    .collect();
                (!v.is_empty()).then(|| format!("{t} {}", v.join(", ")))
            })
            .collect();
        if !cells.is_empty() {
            let _ = writeln!(out, "- {label}: {}", cells.join("; "));
        }
    }
}

/// The README's performance table: the headline figures of the same run, compact.
fn readme(results: &Results, meta: &Meta) -> String {
    let rate = meta.get("Fixed rate (req/s)");
    let plain = plain_rows(results, &rate);
    let tls = tls_rows(results, &rate);
    let mut met: Vec<bool> = plain.iter().filter_map(|r| r.judge(2).1).collect();
    met.extend(tls.iter().flat_map(|r| [r.judge(2).1, r.judge(3).1]).flatten());
    met.extend(token_target(results));
    let find = |rows: &[Row], prefix: &str| rows.iter().position(|r| r.label.starts_with(prefix));
    let num = |v: Option<f64>, d: usize| v.map_or("—".into(), |v| format!("{v:.d$}"));
    let k = |v: Option<f64>| v.map_or("—".into(), |v| format!("{:.1}k", v / 1000.0));
    let mark = |m: Option<bool>| match m {
        Some(true) => "yes",
        Some(false) => "no",
        None => "",
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        "Latest full run ({}, revision {}), {} shared cores, medians of {} rounds; every figure from \
         that one run of `bash bench/run.sh`, like `bench/RESULTS.md`, which has the rest. \
         Targets met: {} of {}.\n",
        meta.get("Date"),
        meta.get("sidekey revision"),
        meta.get("Cores (nproc)"),
        results.rounds().max(1),
        met.iter().filter(|m| **m).count(),
        met.len(),
    );
    out.push_str(
        "| scenario | direct | nginx | sidekey | hyper floor | target | met |\n|---|---:|---:|---:|---:|---|---|\n",
    );
    let mut line = |label: &str, cells: [String; 4], target: &str, met: String| {
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {target} | {met} |",
            cells[0], cells[1], cells[2], cells[3]
        );
    };
    // (TLS table?, label prefix, row label, unit, decimals, in thousands)
    for (is_tls, prefix, label, unit, d, thousands) in [
        (false, "(1) Throughput", "throughput, 64 connections, 1 KB JSON", "req/s", 0, true),
        (false, "(1) CPU per request, proxy", "CPU per request at that load", "µs", 1, false),
        (true, "(7) Throughput", "HTTPS upstream: throughput (sidekey h1 / h2)", "req/s", 0, true),
        (true, "(7) CPU per request, proxy", "HTTPS upstream: CPU per request (h1 / h2)", "µs", 1, false),
    ] {
        let rows = if is_tls { &tls } else { &plain };
        let Some(i) = find(rows, prefix) else { continue };
        let r = &rows[i];
        let f = |v: Option<f64>| if thousands { k(v) } else { num(v, d) };
        let (sk, floor, met) = if is_tls {
            (
                format!(
                    "{} / {} {unit} ({} / {} × nginx)",
                    f(r.value(2)),
                    f(r.value(3)),
                    num(r.ratio(2), 2),
                    num(r.ratio(3), 2)
                ),
                format!("{} / {} {unit}", f(r.value(4)), f(r.value(5))),
                format!("{} / {}", mark(r.judge(2).1), mark(r.judge(3).1)),
            )
        } else {
            (
                format!("{} {unit} ({} × nginx)", f(r.value(2)), num(r.ratio(2), 2)),
                format!("{} {unit}", f(r.value(3))),
                mark(r.judge(2).1).to_string(),
            )
        };
        let direct = if r.value(0).is_some() { format!("{} {unit}", f(r.value(0))) } else { String::new() };
        let floor = if floor.starts_with('—') { String::new() } else { floor };
        line(label, [direct, format!("{} {unit}", f(r.value(1))), sk, floor], &r.judge(2).0, met);
    }
    let pair = |rows: &[Row], a: &str, b: &str, col: usize| -> String {
        let (Some(a), Some(b)) = (find(rows, a), find(rows, b)) else { return "—".into() };
        format!("{} / {} ms", num(rows[a].value(col), 3), num(rows[b].value(col), 3))
    };
    let p50 = format!("(2) Latency p50 at {rate}");
    let p99 = format!("(2) Latency p99 at {rate}");
    let (i50, i99) = (find(&plain, &p50), find(&plain, &p99));
    let met = format!(
        "p50 {}, p99 {}",
        i50.map_or("", |i| mark(plain[i].judge(2).1)),
        i99.map_or("", |i| mark(plain[i].judge(2).1))
    );
    line(
        &format!("latency at {rate} req/s, 16 connections: p50 / p99"),
        [
            pair(&plain, &p50, &p99, 0),
            pair(&plain, &p50, &p99, 1),
            pair(&plain, &p50, &p99, 2),
            String::new(),
        ],
        "p50 ≤ +0.15 ms over direct; p99 ≤ nginx and ≤ +0.5 ms over direct",
        met,
    );
    let t99 = format!("(7) Latency p99 at {rate}");
    if let Some(i) = find(&tls, &t99) {
        let r = &tls[i];
        line(
            &format!("HTTPS upstream: p99 at {rate} req/s (h1 / h2)"),
            [
                format!("{} ms", num(r.value(0), 3)),
                format!("{} ms", num(r.value(1), 3)),
                format!("{} / {} ms", num(r.value(2), 3), num(r.value(3), 3)),
                String::new(),
            ],
            &r.judge(2).0,
            format!("{} / {}", mark(r.judge(2).1), mark(r.judge(3).1)),
        );
    }
    let s50 = "(2) Latency p50 at one connection";
    let s99 = "(2) Latency p99 at one connection";
    line(
        "one connection, one request at a time: p50 / p99",
        [pair(&plain, s50, s99, 0), pair(&plain, s50, s99, 1), pair(&plain, s50, s99, 2), String::new()],
        "",
        String::new(),
    );
    let f1 = "(3) SSE, 100 streams × 100 chunks: time to first chunk p99";
    let d1 = "(3) SSE, 100 streams × 100 chunks: per-chunk delay p99";
    let met =
        [f1, d1].iter().filter_map(|p| find(&plain, p)).map(|i| plain[i].judge(2).1).collect::<Vec<_>>();
    line(
        "SSE, 100 streams × 100 chunks: first chunk / per-chunk delay, p99",
        [pair(&plain, f1, d1, 0), pair(&plain, f1, d1, 1), pair(&plain, f1, d1, 2), String::new()],
        "≤ +1 ms over direct",
        met.iter().map(|m| mark(*m)).collect::<Vec<_>>().join(" / "),
    );
    let mem = |prefix: &str| find(&plain, prefix).map(|i| &plain[i]);
    if let (Some(idle), Some(hold)) = (mem("(4) Idle RSS"), mem("(4) RSS with 1,000")) {
        let both = |c: usize| format!("{} / {} MiB", num(idle.value(c), 1), num(hold.value(c), 1));
        line(
            "idle RSS / with 1,000 open streams",
            [String::new(), both(1), both(2), String::new()],
            "≤ 12 / ≤ 64 MiB",
            format!("{} / {}", mark(idle.judge(2).1), mark(hold.judge(2).1)),
        );
    }
    if let Some(up) = mem("(4) RSS growth") {
        line(
            "RSS growth during a 100 MiB chunked upload",
            [
                String::new(),
                format!("{} MiB", num(up.value(1), 1)),
                format!("{} MiB", num(up.value(2), 1)),
                String::new(),
            ],
            "≤ 1 MiB replay buffer + 8 MiB",
            mark(up.judge(2).1).to_string(),
        );
    }
    if let Some(st) = mem("(5) Startup") {
        line(
            "startup to ready (instant IAM)",
            [
                String::new(),
                format!("{} ms", num(st.value(1), 1)),
                format!("{} ms", num(st.value(2), 1)),
                String::new(),
            ],
            "",
            String::new(),
        );
    }
    let on = results.median("throughput", "sidekey", "/rps");
    let off = results.median("throughput", "sidekey_noscan", "/rps");
    if let (Some(on), Some(off)) = (on, off) {
        let cost = (off - on) / off * 100.0;
        line(
            "usage accounting cost (throughput, `usage.scan` on vs off)",
            [String::new(), String::new(), format!("{cost:.1} %"), String::new()],
            "< 5 %",
            mark(Some(cost < 5.0)).to_string(),
        );
    }
    let rps = |t: &str| results.median("throughput", t, "/rps");
    let cpu = |t: &str| results.median("throughput", t, "/cpu/proxy_us_per_req");
    let cpu_delta = |t: &str| match (cpu(t), cpu("sidekey")) {
        (Some(v), Some(b)) => format!("{:+.1}", v - b),
        _ => "—".into(),
    };
    if let (Some(base), Some(c), Some(s)) = (rps("sidekey"), rps("sidekey_clients"), rps("sidekey_signed")) {
        line(
            "client auth, a `[[clients]]` key / an HS256 signed key: throughput, CPU per request",
            [
                String::new(),
                String::new(),
                format!(
                    "{:+.1} % / {:+.1} %; {} / {} µs",
                    (c - base) / base * 100.0,
                    (s - base) / base * 100.0,
                    cpu_delta("sidekey_clients"),
                    cpu_delta("sidekey_signed")
                ),
                String::new(),
            ],
            "",
            String::new(),
        );
    }
    let micro = |name: &str| results.of("micro", "sidekey").find(|r| r.data["name"] == name).map(|r| &r.data);
    if let (Some(all), Some(tok)) = (micro("all"), micro("token_inject")) {
        line(
            "per-request header work: URI rewrite + header filtering + token injection",
            [
                String::new(),
                String::new(),
                format!(
                    "{} ns, {} allocations (token injection: {} ns, {} allocations, no lock, no await)",
                    num(all["ns"].as_f64(), 0),
                    num(all["allocs"].as_f64(), 0),
                    num(tok["ns"].as_f64(), 0),
                    num(tok["allocs"].as_f64(), 0)
                ),
                String::new(),
            ],
            "token: 0 allocations",
            mark(token_target(results)).to_string(),
        );
    }
    let caller = |name: &str| {
        results
            .of("micro_caller", "sidekey")
            .find(|r| r.data["name"] == name)
            .and_then(|r| r.data["ns"].as_f64())
    };
    if let (Some(c), Some(v)) = (caller("client_key_100"), caller("signed_verify")) {
        line(
            "caller path: client-key lookup among 100 clients / HS256 signed-key check",
            [
                String::new(),
                String::new(),
                format!("{} / {} ns", num(Some(c), 0), num(Some(v), 0)),
                String::new(),
            ],
            "",
            String::new(),
        );
    }
    out
}
