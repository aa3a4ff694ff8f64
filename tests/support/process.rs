//! The real binary as a child process: started on port 0 with a config pointing at the fakes,
//! its addresses read from the startup log line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_sidekey");

/// A sidekey process and the addresses it logged at startup.
pub struct Proc {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl Proc {
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill").args(["-s", name, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits (bounded) for the exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "sidekey did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on port 0 with JSON logs, reads the bound addresses from its startup line,
/// and waits until it is ready.
pub async fn spawn(iam: &FakeIam, upstream: &str, extra: &str) -> Proc {
    let proc = spawn_unready(iam, upstream, extra).await;
    let c = client();
    let url = format!("http://{}/readyz", proc.admin);
    let deadline = Instant::now() + WAIT;
    while c.get(&url).send().await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "sidekey never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proc
}

/// Starts the binary without waiting for a token.
pub async fn spawn_unready(iam: &FakeIam, upstream: &str, extra: &str) -> Proc {
    let dir = std::env::temp_dir().join(format!("sidekey-proc-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sidekey.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}\n\
             [upstream]\nbase_url = \"{upstream}\"\n\
             [auth]\ntoken_url = \"{}\"\n[[auth.credentials]]\nname = \"primary\"\nkey_id = \"{PRIMARY_KEY}\"\nsecret = \"{PRIMARY_SECRET}\"\n\
             [log]\nformat = \"json\"\n",
            iam.url()
        ),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    // The test's own SIDEKEY_* variables (SIDEKEY_CHURN_SECS, ...) would be read as config keys.
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("SIDEKEY_")) {
        command.env_remove(name);
    }
    let mut child = command
        .args(["--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = tokio::task::spawn_blocking(move || {
        loop {
            let line = rx.recv_timeout(WAIT).expect("startup line");
            if line.contains("sidekey started") {
                // keep draining so the child never blocks on a full pipe
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return line;
            }
        }
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&started).unwrap();
    Proc {
        child,
        proxy: json["listen"].as_str().unwrap().parse().unwrap(),
        admin: json["admin_listen"].as_str().unwrap().parse().unwrap(),
    }
}

impl Proc {
    /// Resident memory of the process, from /proc, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}
