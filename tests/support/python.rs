//! The official OpenAI Python SDK as a test driver: `.ci/run` installs the `openai` package;
//! without it a test fails with a message saying so.

use std::time::Duration;

/// Runs a Python snippet with `env` set (and the caller's own `OPENAI_*` variables removed);
/// returns its stdout, failing on a non-zero exit.
pub async fn run(script: &str, env: &[(&str, &str)]) -> String {
    let mut command = tokio::process::Command::new("python3");
    command
        .arg("-c")
        .arg(script)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("python finished in time")
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'openai'"),
        "the OpenAI Python SDK is missing: pip install openai (.ci/run does)"
    );
    assert!(out.status.success(), "python failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
