//! The `sidekey` binary: parse arguments, load config (exit 64 on error), run.

use std::process::ExitCode;

use sidekey::cli::{self, Command};
use sidekey::{logging, App, Config};

/// EX_USAGE / EX_CONFIG-style exit code for bad arguments or configuration.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1), std::env::var_os("SIDEKEY_CONFIG")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sidekey: {e}\n{}", cli::USAGE);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match command {
        Command::Help => {
            println!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("sidekey {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config } => match load(config.as_deref()) {
            Ok(config) => {
                print!("{}", config.to_redacted_toml());
                eprintln!("sidekey: config OK");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            logging::init(&config.log);
            runtime().block_on(async {
                match App::bind(config).await {
                    Ok(app) => {
                        let stop = app.shutdown_token();
                        sidekey::signal::watch(stop.clone());
                        app.run(stop.cancelled_owned()).await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => startup_failed(&e),
                }
            })
        }
        Command::Mint(args) => {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            match sidekey::signed::mint::mint(&args, now) {
                Ok(key) => {
                    println!("{key}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sidekey: mint: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Dev { config } => {
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sidekey: config error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            logging::init(&config.log);
            runtime().block_on(async {
                match sidekey::dev::run(config, sidekey::signal::shutdown()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => startup_failed(&e),
                }
            })
        }
    }
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).and_then(|c| c.validate().map(|()| c)).map_err(|e| {
        eprintln!("sidekey: config error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn startup_failed(e: &sidekey::app::AppError) -> ExitCode {
    let chain = sidekey::token::refresher::error_chain(e);
    tracing::error!(error = %chain, "Startup failed");
    eprintln!("sidekey: {chain}");
    match e {
        sidekey::app::AppError::Config(_) => ExitCode::from(EXIT_CONFIG),
        _ => ExitCode::FAILURE,
    }
}

/// The control runtime: token refresher, admin listener, signals. The proxy itself runs on its
/// own worker threads (see `App::run`), so one thread is plenty here.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime starts")
}
