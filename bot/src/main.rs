//! `storinator-bot`: the chat front end. Configuration comes from the environment (and
//! `bot.env`); see `bot.env.example`.

use clap::Parser;

/// T-Storinator chat bot: turns /backup, /restore and friends into jobs for the worker.
///
/// Configuration comes from the environment (and a `bot.env` file in the current directory,
/// never the worker's `.env`); every variable is described in bot.env.example. The bot refuses
/// to start if the worker's secrets (STORINATOR_PASSPHRASE, TELEGRAM_API_HASH, ...) are in its
/// environment. Required: TELOXIDE_TOKEN (from @BotFather),
/// STORINATOR_ALLOWED_USERS (comma-separated Telegram user ids), STORINATOR_BACKUP_ROOTS
/// (comma-separated folders /backup may name). The bot and `storinator-worker run` share one
/// SQLite database: set STORINATOR_DATA_DIR (or DATABASE_URL) to the same value for both.
/// TELOXIDE_API_URL points the bot at another Bot API server (tests, a local server).
///
/// Stops cleanly on SIGINT or SIGTERM. Logging: RUST_LOG (default info).
#[derive(Parser, Debug)]
#[command(name = "storinator-bot", version, about, long_about)]
struct Args {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Args::parse();
    // Logs go to stderr, coloured only for a person at a terminal (journald gets plain text).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,teloxide=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = storinator_bot::BotConfig::from_env()?;
    storinator_bot::run(config, shutdown_signal()).await
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
