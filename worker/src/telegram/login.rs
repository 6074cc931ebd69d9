//! Interactive sign-in of the userbot: phone number, login code, two-step verification
//! password (SRP-2048, grammers-crypto's proof).
//!
//! The sign-in calls are made here, not through grammers-client's login helpers: those panic
//! on answers Telegram does give (a login code sent in a way they do not know, a payment
//! request, odd password parameters). Every answer gets a clear error instead: data-centre
//! migrations are followed, short flood waits waited out, and what cannot be done from a
//! server (a flash call, Firebase, a required login email, a payment) is explained.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use grammers_client::Client;
use grammers_client::sender::{ConnectionParams, NoRetries, SenderPool, SenderPoolHandle};
use grammers_mtsender::{InvocationError, RpcError};
use grammers_session::Session;
use grammers_session::types::{PeerAuth, PeerInfo};
use grammers_tl_types as tl;

use super::TelegramConfig;
use super::errors::{self, Action};
use super::session::FileSession;

/// Longest flood wait the login sits through by itself; longer ones end it with the time to
/// come back.
const MAX_LOGIN_WAIT: Duration = Duration::from_secs(60);
/// Data-centre moves followed in one call (Telegram sends at most one).
const MAX_MIGRATIONS: u32 = 2;

/// A question the login asks.
#[derive(Debug)]
pub struct Question {
    pub text: String,
    /// The answer is a secret: read without echo.
    pub secret: bool,
}

fn prompt(q: &Question) -> anyhow::Result<String> {
    if q.secret {
        if !std::io::stdin().is_terminal() {
            bail!(
                "the two-step verification password must be typed on a terminal\nhint: run `storinator-worker login` interactively (docker: `docker compose run --rm worker login` keeps a terminal)"
            );
        }
        // rpassword turns echo off on the terminal while the password is typed.
        return rpassword::prompt_password(&q.text).context("reading the password");
    }
    let mut out = std::io::stdout();
    write!(out, "{}", q.text)?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Signs the userbot in and persists the session at `session_path` (mode 0600). Asks on the
/// terminal for the phone number, the code Telegram sends, and the two-step verification
/// password (without echo) if the account has one. Returns without asking anything if the
/// session is already signed in.
pub async fn login_interactive(cfg: &TelegramConfig, session_path: &Path) -> anyhow::Result<()> {
    login_with(cfg, session_path, &mut prompt).await
}

/// [`login_interactive`] with the questions answered by `ask` (tests, other front ends).
pub async fn login_with(
    cfg: &TelegramConfig,
    session_path: &Path,
    ask: &mut (dyn FnMut(&Question) -> anyhow::Result<String> + Send),
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
    let params = ConnectionParams {
        retry_policy: Box::new(NoRetries),
        device_model: "storinator".into(),
        app_version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let pool = SenderPool::with_configuration(session.clone(), cfg.api_id, params);
    let handle = pool.handle.thin.clone();
    let client = Client::new(pool.handle);
    drop(pool.updates);
    let runner = tokio::spawn(pool.runner.run());
    let login = Login {
        client: &client,
        handle,
        session: &session,
        cfg,
    };
    let result = login.run(session_path, ask).await;
    client.disconnect();
    runner.abort();
    result
}

struct Login<'a> {
    client: &'a Client,
    handle: SenderPoolHandle,
    session: &'a FileSession,
    cfg: &'a TelegramConfig,
}

/// How a call went, for the sign-in flow.
enum Failed {
    Rpc(RpcError),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failed {
    fn from(e: anyhow::Error) -> Self {
        Failed::Other(e)
    }
}

impl Login<'_> {
    async fn run(
        &self,
        session_path: &Path,
        ask: &mut (dyn FnMut(&Question) -> anyhow::Result<String> + Send),
    ) -> anyhow::Result<()> {
        match self
            .client
            .invoke(&tl::functions::updates::GetState {})
            .await
        {
            Ok(_) => {
                println!("Already signed in ({}).", session_path.display());
                return Ok(());
            }
            Err(InvocationError::Rpc(e)) if e.code == 401 => {}
            Err(InvocationError::Rpc(e)) => bail!("telegram refused: {}", errors::describe(&e)),
            Err(e) => return Err(self.unreachable(&e)),
        }
        let phone = ask(&Question {
            text: "Phone number (international format): ".into(),
            secret: false,
        })?;
        let auth = match self.send_code(&phone).await? {
            Sent::Code { hash, how } => {
                let code = ask(&Question {
                    text: format!("Login code ({how}): "),
                    secret: false,
                })?;
                self.sign_in(&phone, &hash, &code, ask).await?
            }
            Sent::SignedIn(auth) => *auth,
        };
        self.adopt(auth).await?;
        self.session.save().context("saving the session")?;
        println!("Signed in; session saved to {}.", session_path.display());
        Ok(())
    }

    /// The error for a first call that could not reach Telegram at all.
    fn unreachable(&self, e: &InvocationError) -> anyhow::Error {
        let dc = self.session.home_dc_id().unwrap_or(2);
        let addr = self
            .session
            .dc_option(dc)
            .ok()
            .flatten()
            .map(|o| o.ipv4.to_string())
            .unwrap_or_else(|| "an unknown address".into());
        anyhow::anyhow!(
            "could not reach Telegram at {addr} (data centre {dc}): {e}\nhint: check this machine's network connection, DNS, firewall and proxy: it must reach Telegram's servers over TCP (port 443)"
        )
    }

    /// Invokes `req`, following data-centre moves and sitting through short flood waits.
    async fn call<R: tl::RemoteCall>(&self, req: &R) -> Result<R::Return, Failed> {
        let mut migrations = 0;
        loop {
            let e = match self.client.invoke(req).await {
                Ok(v) => return Ok(v),
                Err(InvocationError::Rpc(e)) => e,
                Err(e) => return Err(Failed::Other(self.unreachable(&e))),
            };
            match errors::classify(&e) {
                Action::Wait => {
                    let secs = u64::from(e.value.unwrap_or(1));
                    let wait = Duration::from_secs(secs);
                    if wait > MAX_LOGIN_WAIT {
                        return Err(Failed::Other(anyhow::anyhow!(
                            "telegram asks to wait {} before another sign-in attempt ({})\nhint: run `storinator-worker login` again after that",
                            human_wait(secs),
                            e.name
                        )));
                    }
                    println!("Telegram asks to wait {secs}s ({}); waiting…", e.name);
                    tokio::time::sleep(wait).await;
                }
                _ if e.code == 303 && e.value.is_some() && migrations < MAX_MIGRATIONS => {
                    migrations += 1;
                    let to = e.value.unwrap_or(0) as i32;
                    let from = self.session.home_dc_id().unwrap_or(0);
                    if self.session.dc_option(to).ok().flatten().is_none() {
                        return Err(Failed::Other(anyhow::anyhow!(
                            "telegram moved the sign-in to data centre {to}, whose address this session does not know ({})",
                            e.name
                        )));
                    }
                    // The connection to the old home is of no further use.
                    self.handle.disconnect_from_dc(from);
                    self.session
                        .set_home_dc_id(to)
                        .await
                        .context("saving the session's home data centre")?;
                    println!("Telegram moved the sign-in to data centre {to}.");
                }
                _ => return Err(Failed::Rpc(e)),
            }
        }
    }

    async fn send_code(&self, phone: &str) -> anyhow::Result<Sent> {
        let req = tl::functions::auth::SendCode {
            phone_number: phone.into(),
            api_id: self.cfg.api_id,
            api_hash: self.cfg.api_hash.clone(),
            settings: tl::enums::CodeSettings::Settings(tl::types::CodeSettings {
                allow_flashcall: false,
                current_number: false,
                allow_app_hash: false,
                allow_missed_call: false,
                allow_firebase: false,
                unknown_number: false,
                logout_tokens: None,
                token: None,
                app_sandbox: None,
            }),
        };
        let sent = match self.call(&req).await {
            Ok(s) => s,
            Err(Failed::Other(e)) => return Err(e),
            Err(Failed::Rpc(e)) => bail!(
                "requesting a login code for {phone} failed: {}",
                errors::describe(&e)
            ),
        };
        sent_code(sent)
    }

    async fn sign_in(
        &self,
        phone: &str,
        hash: &str,
        code: &str,
        ask: &mut (dyn FnMut(&Question) -> anyhow::Result<String> + Send),
    ) -> anyhow::Result<tl::types::auth::Authorization> {
        let req = tl::functions::auth::SignIn {
            phone_number: phone.into(),
            phone_code_hash: hash.into(),
            phone_code: Some(code.trim().into()),
            email_verification: None,
        };
        match self.call(&req).await {
            Ok(a) => authorization(a, phone),
            Err(Failed::Other(e)) => Err(e),
            Err(Failed::Rpc(e)) if e.name == "SESSION_PASSWORD_NEEDED" => {
                self.check_password(ask).await
            }
            Err(Failed::Rpc(e)) if e.name == "PHONE_CODE_INVALID" => bail!(
                "login code {code:?} was not accepted ({})\nhint: run `storinator-worker login` again and type the code Telegram sent",
                errors::describe(&e)
            ),
            Err(Failed::Rpc(e)) if e.name == "PHONE_CODE_EXPIRED" => bail!(
                "the login code expired before it was used ({})\nhint: run `storinator-worker login` again for a new code",
                errors::describe(&e)
            ),
            Err(Failed::Rpc(e)) => bail!("signing in failed: {}", errors::describe(&e)),
        }
    }

    /// Two-step verification: account.getPassword, the SRP proof, auth.checkPassword.
    async fn check_password(
        &self,
        ask: &mut (dyn FnMut(&Question) -> anyhow::Result<String> + Send),
    ) -> anyhow::Result<tl::types::auth::Authorization> {
        let tl::enums::account::Password::Password(pw) =
            match self.call(&tl::functions::account::GetPassword {}).await {
                Ok(p) => p,
                Err(Failed::Other(e)) => return Err(e),
                Err(Failed::Rpc(e)) => bail!(
                    "reading the two-step verification settings failed: {}",
                    errors::describe(&e)
                ),
            };
        let hint = pw.hint.as_deref().unwrap_or("none");
        let srp = srp_parameters(&pw)?;
        let password = ask(&Question {
            text: format!("Two-step verification password (hint: {hint}): "),
            secret: true,
        })?;
        let (m1, g_a) = srp.prove(password.as_bytes());
        let req = tl::functions::auth::CheckPassword {
            password: tl::enums::InputCheckPasswordSrp::Srp(tl::types::InputCheckPasswordSrp {
                srp_id: srp.id,
                a: g_a.to_vec(),
                m1: m1.to_vec(),
            }),
        };
        match self.call(&req).await {
            Ok(a) => authorization(a, "this account"),
            Err(Failed::Other(e)) => Err(e),
            Err(Failed::Rpc(e)) if e.name == "PASSWORD_HASH_INVALID" => bail!(
                "the two-step verification password is wrong ({})\nhint: run `storinator-worker login` again",
                e.name
            ),
            Err(Failed::Rpc(e)) => {
                bail!("the two-step verification failed: {}", errors::describe(&e))
            }
        }
    }

    /// Records the signed-in user in the session (the storage backend checks it is there).
    async fn adopt(&self, auth: tl::types::auth::Authorization) -> anyhow::Result<()> {
        let tl::enums::User::User(u) = auth.user else {
            bail!("telegram signed in an empty user");
        };
        let hash = u
            .access_hash
            .ok_or_else(|| anyhow::anyhow!("telegram signed in a user without an access hash"))?;
        self.session
            .cache_peer(PeerInfo::User {
                id: u.id,
                auth: Some(PeerAuth::from_hash(hash)),
                bot: Some(u.bot),
                is_self: Some(true),
            })
            .await
            .context("saving the signed-in user")?;
        Ok(())
    }
}

/// What auth.sendCode said.
enum Sent {
    Code { hash: String, how: String },
    SignedIn(Box<tl::types::auth::Authorization>),
}

fn sent_code(sent: tl::enums::auth::SentCode) -> anyhow::Result<Sent> {
    use tl::enums::auth::SentCodeType as T;
    let code = match sent {
        tl::enums::auth::SentCode::Code(c) => c,
        tl::enums::auth::SentCode::Success(s) => {
            let auth = authorization(s.authorization, "this account")?;
            return Ok(Sent::SignedIn(Box::new(auth)));
        }
        tl::enums::auth::SentCode::PaymentRequired(p) => bail!(
            "telegram asks for a payment ({} {}) before it sends a login code to this number (auth.sentCodePaymentRequired)\nhint: sign in once with an official Telegram app, then run `storinator-worker login` again",
            p.amount,
            p.currency
        ),
    };
    let how = match &code.r#type {
        T::App(_) => "sent to your other Telegram apps".to_string(),
        T::Sms(_) | T::SmsWord(_) | T::SmsPhrase(_) => "sent by SMS".to_string(),
        T::Call(_) => "read out in a phone call".to_string(),
        T::FragmentSms(f) => format!("sent through Fragment: {}", f.url),
        T::EmailCode(e) => format!("sent to the login email {}", e.email_pattern),
        T::FlashCall(_) | T::MissedCall(_) => bail!(
            "telegram wants to verify this number with a phone call whose caller id is the code, which storinator cannot receive\nhint: sign in once with an official Telegram app, then run `storinator-worker login` again"
        ),
        T::SetUpEmailRequired(_) => bail!(
            "telegram requires this account to set up a login email before it sends codes\nhint: set one up in an official Telegram app (Settings > Privacy and Security), then run `storinator-worker login` again"
        ),
        T::FirebaseSms(_) => bail!(
            "telegram wants to deliver the code through Firebase (a phone app service), which storinator cannot use\nhint: sign in once with an official Telegram app, then run `storinator-worker login` again"
        ),
    };
    Ok(Sent::Code {
        hash: code.phone_code_hash,
        how,
    })
}

fn authorization(
    a: tl::enums::auth::Authorization,
    who: &str,
) -> anyhow::Result<tl::types::auth::Authorization> {
    match a {
        tl::enums::auth::Authorization::Authorization(a) => Ok(a),
        tl::enums::auth::Authorization::SignUpRequired(_) => bail!(
            "{who} has no Telegram account\nhint: sign up with an official Telegram app first"
        ),
    }
}

/// The SRP parameters of account.password, checked as core.telegram.org/api/srp asks.
struct Srp {
    id: i64,
    salt1: Vec<u8>,
    salt2: Vec<u8>,
    p: Vec<u8>,
    g: i32,
    g_b: Vec<u8>,
    random: Vec<u8>,
}

fn srp_parameters(pw: &tl::types::account::Password) -> anyhow::Result<Srp> {
    use tl::enums::PasswordKdfAlgo as A;
    let algo = match &pw.current_algo {
        Some(A::Sha256Sha256Pbkdf2Hmacsha512iter100000Sha256ModPow(a)) => a,
        Some(A::Unknown) => bail!(
            "telegram uses a two-step verification algorithm this version does not know\nhint: update storinator"
        ),
        None => bail!(
            "telegram asked for a two-step verification password, but the account has none set"
        ),
    };
    let (Some(g_b), Some(id)) = (pw.srp_b.clone(), pw.srp_id) else {
        bail!("telegram sent two-step verification settings without an SRP challenge");
    };
    // grammers-crypto's check panics on generators it does not know; Telegram uses 2..=7.
    if !(2..=7).contains(&algo.g)
        || !grammers_crypto::two_factor_auth::check_p_and_g(&algo.p, &algo.g)
    {
        bail!("telegram sent two-step verification parameters that fail the SRP safety checks");
    }
    let p = num_bigint::BigUint::from_bytes_be(&algo.p);
    let gb = num_bigint::BigUint::from_bytes_be(&g_b);
    if gb <= num_bigint::BigUint::from(1u32) || gb >= &p - 1u32 || g_b.len() > 256 {
        bail!("telegram sent an SRP challenge outside the group");
    }
    // The secret exponent mixes our own randomness with Telegram's, so neither alone
    // decides it.
    let mut random = vec![0u8; 256];
    getrandom::fill(&mut random)
        .map_err(|e| anyhow::anyhow!("reading the system's random source: {e}"))?;
    for (r, s) in random.iter_mut().zip(&pw.secure_random) {
        *r ^= s;
    }
    Ok(Srp {
        id,
        salt1: algo.salt1.clone(),
        salt2: algo.salt2.clone(),
        p: algo.p.clone(),
        g: algo.g,
        g_b,
        random,
    })
}

impl Srp {
    fn prove(&self, password: &[u8]) -> ([u8; 32], [u8; 256]) {
        grammers_crypto::two_factor_auth::calculate_2fa(
            &self.salt1,
            &self.salt2,
            &self.p,
            &self.g,
            self.g_b.clone(),
            self.random.clone(),
            password,
        )
    }
}

fn human_wait(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_code_deliveries_are_explained_not_panicked_on() {
        use tl::enums::auth::SentCodeType as T;
        let code = |t: T| {
            tl::enums::auth::SentCode::Code(tl::types::auth::SentCode {
                r#type: t,
                phone_code_hash: "h".into(),
                next_type: None,
                timeout: None,
            })
        };
        let flash = T::FlashCall(tl::types::auth::SentCodeTypeFlashCall {
            pattern: "*".into(),
        });
        let e = sent_code(code(flash)).err().unwrap().to_string();
        assert!(e.contains("phone call") && e.contains("hint:"), "{e}");
        let sms = T::Sms(tl::types::auth::SentCodeTypeSms { length: 5 });
        assert!(
            matches!(sent_code(code(sms)).unwrap(), Sent::Code { how, .. } if how.contains("SMS"))
        );
        assert_eq!(human_wait(7260), "2h 01m");
    }
}
