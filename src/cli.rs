//! Command-line parsing: `sidekey [--config FILE]`, `sidekey check [--config FILE]`,
//! `sidekey dev`, `--help`, `--version`.

use std::ffi::OsString;
use std::path::PathBuf;

pub const USAGE: &str = "\
usage:
  sidekey [--config FILE]          run the proxy (FILE also from SIDEKEY_CONFIG)
  sidekey check [--config FILE]    validate the config and print it with secrets redacted
  sidekey dev [--config FILE]      self-contained demo: fake IAM + echoing upstream on loopback
  sidekey --help | --version";

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run { config: Option<PathBuf> },
    Check { config: Option<PathBuf> },
    Dev { config: Option<PathBuf> },
    Help,
    Version,
}

/// A command line that makes no sense.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error("--config needs a file path")]
    MissingValue,
}

/// Parses arguments (without the program name); `env_config` is `SIDEKEY_CONFIG`.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env_config: Option<OsString>,
) -> Result<Command, UsageError> {
    let mut args = args.into_iter().peekable();
    let mut sub = None;
    if let Some(first) = args.peek().and_then(|a| a.to_str()) {
        if matches!(first, "run" | "check" | "dev") {
            sub = Some(first.to_string());
            args.next();
        }
    }
    let mut config = None;
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        match text.as_str() {
            "-h" | "--help" | "help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "-c" | "--config" => config = Some(PathBuf::from(args.next().ok_or(UsageError::MissingValue)?)),
            _ if text.starts_with("--config=") => config = Some(PathBuf::from(&text["--config=".len()..])),
            _ => return Err(UsageError::Unknown(text)),
        }
    }
    let config = config.or_else(|| env_config.filter(|v| !v.is_empty()).map(PathBuf::from));
    Ok(match sub.as_deref() {
        Some("check") => Command::Check { config },
        Some("dev") => Command::Dev { config },
        _ => Command::Run { config },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str], env: Option<&str>) -> Result<Command, UsageError> {
        parse(args.iter().map(OsString::from), env.map(OsString::from))
    }

    #[test]
    fn commands() {
        assert_eq!(p(&[], None), Ok(Command::Run { config: None }));
        assert_eq!(p(&["--config", "a.toml"], None), Ok(Command::Run { config: Some("a.toml".into()) }));
        assert_eq!(p(&["--config=a.toml"], None), Ok(Command::Run { config: Some("a.toml".into()) }));
        assert_eq!(p(&["check", "-c", "b.toml"], None), Ok(Command::Check { config: Some("b.toml".into()) }));
        assert_eq!(p(&["dev"], None), Ok(Command::Dev { config: None }));
        assert_eq!(p(&["--help"], None), Ok(Command::Help));
        assert_eq!(p(&["--version"], None), Ok(Command::Version));
    }

    #[test]
    fn env_config_is_the_fallback() {
        assert_eq!(p(&[], Some("env.toml")), Ok(Command::Run { config: Some("env.toml".into()) }));
        assert_eq!(
            p(&["-c", "flag.toml"], Some("env.toml")),
            Ok(Command::Run { config: Some("flag.toml".into()) })
        );
    }

    #[test]
    fn errors() {
        assert_eq!(p(&["--config"], None), Err(UsageError::MissingValue));
        assert_eq!(p(&["--frobnicate"], None), Err(UsageError::Unknown("--frobnicate".into())));
    }
}
