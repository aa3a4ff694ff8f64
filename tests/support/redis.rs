//! A real `redis-server` (the Debian package) on a free loopback port, started by the test and
//! killed when dropped. No persistence: a restart starts empty.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// How long one start may take before it counts as failed.
const START_WAIT: Duration = Duration::from_secs(10);

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one on a free port, trying another port if something takes it first.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Like [`RedisServer::start`], with extra `redis-server` arguments (`--requirepass`, ...).
    pub async fn start_with(extra: &[&str]) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(free_port(), extra).await {
                Ok(server) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start on any of 5 free ports: {last}");
    }

    /// Starts one on `port`, e.g. again after [`RedisServer::kill`]; retries (bounded) while the
    /// port is still held.
    pub async fn start_on(port: u16, extra: &[&str]) -> Self {
        let deadline = Instant::now() + START_WAIT;
        loop {
            match Self::try_start(port, extra).await {
                Ok(server) => return server,
                Err(e) if Instant::now() >= deadline => panic!("redis-server did not start on {port}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn try_start(port: u16, extra: &[&str]) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "sidekey-redis-{}-{port}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let log = dir.join("redis.log");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("redis-server not found: install the Debian package redis-server (.ci/run does)")
            }
            Err(e) => return Err(format!("spawn: {e}")),
        };
        let mut server =
            Self { child: Some(child), port, dir, extra: extra.iter().map(|s| s.to_string()).collect() };
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Some(status) = server.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<_> = log.lines().rev().take(3).collect();
                server.child = None;
                return Err(format!("exited with {status}: {tail:?}"));
            }
            if ping(port).await {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                return Err("no PONG in time".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills this server and starts a new one on the same port with the same arguments.
    pub async fn restart(mut self) -> Self {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        Self::start_on(self.port, &extra).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port that was free a moment ago (bound on 127.0.0.1:0, then closed).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// True if something on `port` answers `PING` with `+PONG` (or `-NOAUTH`: up, with a password).
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
    };
    timeout(Duration::from_millis(500), attempt).await.ok().flatten().unwrap_or(false)
}
