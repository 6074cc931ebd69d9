//! Interactive sign-in of the userbot: phone number, login code, 2FA password.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use grammers_client::sender::SenderPool;
use grammers_client::{Client, SignInError};

use super::TelegramConfig;
use super::session::FileSession;

fn prompt(question: &str) -> anyhow::Result<String> {
    let mut out = std::io::stdout();
    write!(out, "{question}")?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Signs the userbot in and persists the session at `session_path` (mode 0600). Asks on the
/// terminal for the phone number, the code Telegram sends, and the 2FA password if the
/// account has one. Returns without asking anything if the session is already signed in.
pub async fn login_interactive(cfg: &TelegramConfig, session_path: &Path) -> anyhow::Result<()> {
    login_with(cfg, session_path, &mut prompt).await
}

/// [`login_interactive`] with the questions answered by `ask` (tests, other front ends).
pub async fn login_with(
    cfg: &TelegramConfig,
    session_path: &Path,
    ask: &mut (dyn FnMut(&str) -> anyhow::Result<String> + Send),
) -> anyhow::Result<()> {
    if cfg.api_id == 0 || cfg.api_hash.is_empty() {
        bail!(
            "TELEGRAM_API_ID and TELEGRAM_API_HASH must be set (get them at https://my.telegram.org)"
        );
    }
    let session = Arc::new(
        FileSession::load_or_new(session_path)
            .with_context(|| format!("loading session {}", session_path.display()))?,
    );
    let pool = SenderPool::new(session.clone(), cfg.api_id);
    let client = Client::new(pool.handle);
    drop(pool.updates);
    let runner = tokio::spawn(pool.runner.run());
    let result = async {
        if client
            .is_authorized()
            .await
            .context("contacting telegram")?
        {
            println!("Already signed in ({}).", session_path.display());
            return Ok(());
        }
        let phone = ask("Phone number (international format): ")?;
        let token = client
            .request_login_code(&phone, &cfg.api_hash)
            .await
            .with_context(|| format!("requesting a login code for {phone}"))?;
        let code = ask("Login code: ")?;
        match client.sign_in(&token, &code).await {
            Ok(_) => {}
            Err(SignInError::PasswordRequired(pw)) => {
                let hint = pw.hint().unwrap_or("none").to_string();
                let password = ask(&format!("2FA password (hint: {hint}): "))?;
                client
                    .check_password(pw, password.as_bytes())
                    .await
                    .map_err(|e| anyhow::anyhow!("2FA password rejected: {e}"))?;
            }
            Err(SignInError::InvalidCode) => bail!("login code {code:?} was not accepted"),
            Err(SignInError::SignUpRequired) => {
                bail!("phone {phone} has no Telegram account; sign up with an official app first")
            }
            Err(e) => bail!("sign-in failed: {e}"),
        }
        session.save().context("saving the session")?;
        println!("Signed in; session saved to {}.", session_path.display());
        Ok(())
    }
    .await;
    client.disconnect();
    runner.abort();
    result
}
