//! The metrics contract: every family in the README's metrics table is on `/metrics` from the
//! first scrape of a fresh sidekey, with the type the table gives. The table is read from the
//! README at test time, so a family added there is checked from then on.

mod support;

use support::*;

/// A row of the README's metrics table.
#[derive(Debug)]
struct Family {
    name: String,
    kind: String,
    meaning: String,
}

/// The rows of the table headed `| name | type | labels | meaning |` in README.md.
fn readme_families() -> Vec<Family> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let readme = std::fs::read_to_string(path).expect("README.md is readable");
    let mut lines =
        readme.lines().skip_while(|l| !l.replace(' ', "").starts_with("|name|type|labels|meaning|"));
    lines.next();
    let families: Vec<Family> = lines
        .skip_while(|l| l.starts_with("|---") || l.starts_with("| ---"))
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            assert!(cells.len() >= 4, "a metrics row has four cells: {row}");
            Family {
                name: cells[0].trim_matches('`').to_string(),
                kind: cells[1].to_string(),
                meaning: cells[3..].join("|"),
            }
        })
        .collect();
    assert!(families.len() >= 20, "the README's metrics table was not found or is cut short: {families:?}");
    for f in &families {
        assert!(f.name.starts_with("sidekey_"), "not a metric name: {f:?}");
        assert!(["counter", "gauge", "histogram"].contains(&f.kind.as_str()), "unknown type: {f:?}");
    }
    families
}

/// Families missing from `text`, or rendered without a series or with another type.
fn missing(text: &str, families: &[Family]) -> Vec<String> {
    families
        .iter()
        .filter(|f| {
            let typed = text.lines().any(|l| l == format!("# TYPE {} {}", f.name, f.kind));
            let sample = text.lines().filter(|l| !l.starts_with('#')).any(|l| {
                let series = l.split([' ', '{']).next().unwrap_or_default();
                series == f.name || (f.kind == "histogram" && series == format!("{}_count", f.name))
            });
            !(typed && sample)
        })
        .map(|f| f.name.clone())
        .collect()
}

async fn first_scrape(config: sidekey::Config) -> String {
    let sc = start_sidecar(config).await;
    let resp = client().get(sc.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    sc.shutdown().await;
    text
}

#[tokio::test]
async fn every_readme_family_is_in_the_first_scrape() {
    let families = readme_families();
    // IAM never answers, so nothing has happened yet when /metrics is scraped: no token, no
    // request, no failover.
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Hang);
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.credentials.push(credential("backup", BACKUP_KEY, BACKUP_SECRET));
    let text = first_scrape(cfg).await;
    assert_eq!(missing(&text, &families), Vec::<String>::new(), "{text}");
    assert_eq!(
        metric_value(
            &text,
            r#"sidekey_credential_failovers_total{from="primary",set="default",to="backup"}"#
        ),
        0.0
    );
    assert!(
        text.contains(r#"sidekey_credential_failovers_total{from="backup",set="default",to="primary"} 0"#),
        "{text}"
    );
}

#[tokio::test]
async fn with_one_credential_only_the_documented_exception_is_absent() {
    let families = readme_families();
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Hang);
    let up = FakeUpstream::ok().await;
    let text = first_scrape(config(&iam, &up.base_url())).await;
    let (exempt, expected): (Vec<Family>, Vec<Family>) =
        families.into_iter().partition(|f| f.meaning.contains("none with a single credential"));
    assert_eq!(missing(&text, &expected), Vec::<String>::new(), "{text}");
    let exempt: Vec<&str> = exempt.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(exempt, ["sidekey_credential_failovers_total"]);
}
