//! Command-line parsing: `sidekey [--config FILE]`, `sidekey check [--config FILE]`,
//! `sidekey dev`, `sidekey mint ...`, `--help`, `--version`.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::signed::mint::{parse_ttl, MintArgs};

pub const USAGE: &str = "\
usage:
  sidekey [--config FILE]          run the proxy (FILE also from SIDEKEY_CONFIG)
  sidekey check [--config FILE]    validate the config and print it with secrets redacted
  sidekey dev [--config FILE]      self-contained demo: fake IAM + echoing upstream on loopback
  sidekey mint --secret-file FILE [--ttl 10m] [--model PATTERN]... [--max-tokens N]
               [--budget-tokens N] [--sub ID] [--event-id ID] [--issuer ISS] [--audience AUD]
               [--client NAME] [--jti ID]
                                   print a signed key (HS256, the file's first secret line)
  sidekey --help | --version";

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run {
        config: Option<PathBuf>,
    },
    Check {
        config: Option<PathBuf>,
    },
    Dev {
        config: Option<PathBuf>,
    },
    /// Boxed: the flags outweigh every other command.
    Mint(Box<MintArgs>),
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
    #[error("{0} needs a value")]
    NeedsValue(String),
    #[error("invalid {flag}: {reason}")]
    Invalid { flag: String, reason: &'static str },
    #[error("mint needs {0}")]
    Required(&'static str),
}

/// Parses arguments (without the program name); `env_config` is `SIDEKEY_CONFIG`.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env_config: Option<OsString>,
) -> Result<Command, UsageError> {
    let mut args = args.into_iter().peekable();
    let mut sub = None;
    if let Some(first) = args.peek().and_then(|a| a.to_str()) {
        if first == "mint" {
            args.next();
            return parse_mint(args);
        }
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

/// `sidekey mint` flags, as `--flag VALUE` or `--flag=VALUE`.
fn parse_mint(args: impl Iterator<Item = OsString>) -> Result<Command, UsageError> {
    let mut args = args.map(|a| a.to_string_lossy().into_owned());
    let mut mint = MintArgs::new(PathBuf::new());
    let mut secret_file = None;
    while let Some(arg) = args.next() {
        if matches!(arg.as_str(), "-h" | "--help" | "help") {
            return Ok(Command::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value.to_string())),
            _ => (arg, None),
        };
        let known = [
            "--secret-file",
            "--ttl",
            "--model",
            "--max-tokens",
            "--budget-tokens",
            "--sub",
            "--event-id",
            "--issuer",
            "--audience",
            "--client",
            "--jti",
        ];
        if !known.contains(&flag.as_str()) {
            return Err(UsageError::Unknown(flag));
        }
        let value = match inline.or_else(|| args.next()) {
            Some(v) if !v.is_empty() => v,
            _ => return Err(UsageError::NeedsValue(flag)),
        };
        let invalid = |reason| UsageError::Invalid { flag: flag.clone(), reason };
        let count = |v: &str| match v.parse::<u64>() {
            Ok(0) | Err(_) => Err(invalid("expected a positive integer")),
            Ok(n) => Ok(n),
        };
        match flag.as_str() {
            "--secret-file" => secret_file = Some(PathBuf::from(value)),
            "--ttl" => mint.ttl_secs = parse_ttl(&value).map_err(invalid)?,
            "--model" => mint.models.push(value),
            "--max-tokens" => mint.max_tokens = Some(count(&value)?),
            "--budget-tokens" => mint.budget_tokens = Some(count(&value)?),
            "--sub" => mint.sub = Some(value),
            "--event-id" => mint.event_id = Some(value),
            "--issuer" => mint.issuer = Some(value),
            "--audience" => mint.audience = Some(value),
            "--client" => mint.client = Some(value),
            _ => mint.jti = Some(value),
        }
    }
    mint.secret_file = secret_file.ok_or(UsageError::Required("--secret-file"))?;
    Ok(Command::Mint(Box::new(mint)))
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

    #[test]
    fn mint_flags() {
        let line = "mint --secret-file key --model GigaChat/* --model=gpt-4o --max-tokens 512 \
                    --budget-tokens 20000 --ttl 2h --sub user-42 --event-id ev-1 --issuer backend \
                    --audience=sidekey --client mobile --jti k-1";
        let got = p(&line.split_whitespace().collect::<Vec<_>>(), Some("ignored.toml"));
        let want = MintArgs {
            ttl_secs: 7200,
            models: vec!["GigaChat/*".into(), "gpt-4o".into()],
            max_tokens: Some(512),
            budget_tokens: Some(20_000),
            sub: Some("user-42".into()),
            event_id: Some("ev-1".into()),
            issuer: Some("backend".into()),
            audience: Some("sidekey".into()),
            client: Some("mobile".into()),
            jti: Some("k-1".into()),
            ..MintArgs::new("key")
        };
        assert_eq!(got, Ok(Command::Mint(Box::new(want))));
        assert_eq!(p(&["mint", "--secret-file=k"], None), Ok(Command::Mint(Box::new(MintArgs::new("k")))));
        assert_eq!(p(&["mint", "--help"], None), Ok(Command::Help));
    }

    #[test]
    fn mint_errors() {
        let invalid = |flag: &str, reason| Err(UsageError::Invalid { flag: flag.into(), reason });
        assert_eq!(p(&["mint"], None), Err(UsageError::Required("--secret-file")));
        assert_eq!(p(&["mint", "--secret-file"], None), Err(UsageError::NeedsValue("--secret-file".into())));
        assert_eq!(p(&["mint", "--sub="], None), Err(UsageError::NeedsValue("--sub".into())));
        assert_eq!(p(&["mint", "--config", "x"], None), Err(UsageError::Unknown("--config".into())));
        assert_eq!(p(&["mint", "-s", "x"], None), Err(UsageError::Unknown("-s".into())));
        assert_eq!(
            p(&["mint", "--ttl", "10"], None),
            invalid("--ttl", "expected a number with a unit: 90s, 10m, 2h or 1d")
        );
        assert_eq!(
            p(&["mint", "--max-tokens", "0"], None),
            invalid("--max-tokens", "expected a positive integer")
        );
        assert_eq!(
            p(&["mint", "--budget-tokens", "lots"], None),
            invalid("--budget-tokens", "expected a positive integer")
        );
        let shown = UsageError::Invalid { flag: "--ttl".into(), reason: "x" }.to_string();
        assert_eq!(shown, "invalid --ttl: x");
    }
}
