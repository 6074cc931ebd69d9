//! `storinator-worker login` against the loopback Telegram, through the real grammers client:
//! login codes, two-step verification with SRP-2048, data-centre migration, flood waits,
//! every way Telegram may deliver a code, and no network at all.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use storinator_shared::error::StorageError;
use storinator_shared::storage::Storage;
use storinator_testkit::mtproto::{
    Fault, LOGIN_CODE, LoopbackOptions, LoopbackTelegram, SentCodeKind,
};
use storinator_worker::telegram::{Question, TelegramConfig, TelegramStorage, login_with};

const PHONE: &str = "+10000000000";

struct Env {
    server: LoopbackTelegram,
    session: PathBuf,
    cfg: TelegramConfig,
    _dir: tempfile::TempDir,
}

async fn env(opts: LoopbackOptions) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let server = LoopbackTelegram::start(LoopbackOptions {
        require_login: true,
        ..opts
    })
    .await
    .unwrap();
    let session = dir.path().join("tg.session");
    server.write_session(&session).unwrap();
    let cfg = TelegramConfig::new(1, "hash", session.clone(), dir.path().join("spool"));
    Env {
        server,
        session,
        cfg,
        _dir: dir,
    }
}

/// Answers the login's questions from a script: (expected text fragment, answer).
fn script(
    answers: &[(&'static str, &'static str)],
) -> impl FnMut(&Question) -> anyhow::Result<String> + Send {
    let mut left: Vec<(&str, &str)> = answers.iter().rev().copied().collect();
    move |q: &Question| {
        let (want, answer) = left
            .pop()
            .unwrap_or_else(|| panic!("unexpected question {q:?}"));
        assert!(q.text.contains(want), "asked {q:?}, expected {want:?}");
        assert_eq!(q.secret, want.contains("password"), "{q:?}");
        Ok(answer.to_string())
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test took too long")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_code_persists_a_private_session() {
    bounded(async {
        let e = env(LoopbackOptions::default()).await;
        // Not signed in yet: the backend says what to do.
        let err = TelegramStorage::connect(e.cfg.clone()).await.err().unwrap();
        assert!(matches!(err, StorageError::Fatal(_)), "{err:?}");
        assert!(err.to_string().contains("login"), "{err}");

        // A wrong code is a clear error and leaves the session signed out.
        let err = login_with(
            &e.cfg,
            &e.session,
            &mut script(&[("Phone", PHONE), ("code", "99999")]),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("not accepted") && err.contains("PHONE_CODE_INVALID"),
            "{err}"
        );

        // Whatever the file's mode was, the saved session is private. Without a password
        // nothing more is asked.
        std::fs::set_permissions(&e.session, std::fs::Permissions::from_mode(0o644)).unwrap();
        login_with(
            &e.cfg,
            &e.session,
            &mut script(&[("Phone", PHONE), ("other Telegram apps", LOGIN_CODE)]),
        )
        .await
        .unwrap();
        let mode = std::fs::metadata(&e.session).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&e.session).unwrap();
        assert!(
            text.contains(&e.server.self_user_id().to_string()),
            "{text}"
        );

        // Signed in: a second login asks nothing, and the storage connects.
        login_with(&e.cfg, &e.session, &mut script(&[]))
            .await
            .unwrap();
        TelegramStorage::connect(e.cfg.clone()).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_step_verification_checks_the_password_with_srp() {
    bounded(async {
        let e = env(LoopbackOptions {
            password: Some("hunter2 but longer".into()),
            password_hint: Some("the usual".into()),
            ..Default::default()
        })
        .await;
        let err = login_with(
            &e.cfg,
            &e.session,
            &mut script(&[
                ("Phone", PHONE),
                ("code", LOGIN_CODE),
                ("password (hint: the usual)", "hunter3"),
            ]),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("password is wrong") && err.contains("PASSWORD_HASH_INVALID"),
            "{err}"
        );
        assert!(
            TelegramStorage::connect(e.cfg.clone()).await.is_err(),
            "a wrong password signs nothing in"
        );

        login_with(
            &e.cfg,
            &e.session,
            &mut script(&[
                ("Phone", PHONE),
                ("code", LOGIN_CODE),
                ("password", "hunter2 but longer"),
            ]),
        )
        .await
        .unwrap();
        TelegramStorage::connect(e.cfg.clone()).await.unwrap();
        assert_eq!(e.server.counters().get("auth.checkPassword"), 2);
        assert_eq!(e.server.counters().get("account.getPassword"), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_on_another_data_centre_moves_the_sign_in_there() {
    bounded(async {
        let e = env(LoopbackOptions {
            phone_dc: Some(4),
            ..Default::default()
        })
        .await;
        login_with(
            &e.cfg,
            &e.session,
            &mut script(&[("Phone", PHONE), ("code", LOGIN_CODE)]),
        )
        .await
        .unwrap();
        let c = e.server.counters();
        assert_eq!(c.get("dc2:auth.sendCode"), 1, "PHONE_MIGRATE_4 there");
        assert_eq!(c.get("dc4:auth.sendCode"), 1);
        assert_eq!(c.get("dc4:auth.signIn"), 1);
        assert_eq!(e.server.home_dc(), 4);
        let text = std::fs::read_to_string(&e.session).unwrap();
        assert!(text.contains("\"home_dc\": 4"), "{text}");
        // The storage then works on the new home.
        let storage = TelegramStorage::connect(e.cfg.clone()).await.unwrap();
        storage
            .put_bytes("key-1.enc", b"wrapped".to_vec())
            .await
            .unwrap();
        assert_eq!(c.get("dc4:messages.sendMedia"), 1);
        assert_eq!(e.server.document_dc("key-1.enc"), Some(4));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_code_is_a_clear_error() {
    bounded(async {
        let e = env(LoopbackOptions::default()).await;
        let server = &e.server;
        let mut asked = 0;
        let err = login_with(&e.cfg, &e.session, &mut |q: &Question| {
            asked += 1;
            if q.text.contains("code") {
                // The user took too long.
                server.expire_login_codes();
                return Ok(LOGIN_CODE.to_string());
            }
            Ok(PHONE.to_string())
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("expired") && err.contains("PHONE_CODE_EXPIRED"),
            "{err}"
        );
        assert_eq!(asked, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_waits_during_login_are_waited_out_or_explained() {
    bounded(async {
        let e = env(LoopbackOptions::default()).await;
        e.server
            .faults()
            .on_call("auth.sendCode", 1, Fault::flood_wait(1));
        login_with(
            &e.cfg,
            &e.session,
            &mut script(&[("Phone", PHONE), ("code", LOGIN_CODE)]),
        )
        .await
        .unwrap();
        assert_eq!(e.server.counters().get("auth.sendCode"), 2);
        assert_eq!(e.server.faults().fired_on("auth.sendCode"), 1);

        let e = env(LoopbackOptions::default()).await;
        e.server
            .faults()
            .on_call("auth.sendCode", 1, Fault::flood_wait(86_400));
        let err = login_with(&e.cfg, &e.session, &mut script(&[("Phone", PHONE)]))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("wait 24h 00m") && err.contains("FLOOD_WAIT"),
            "{err}"
        );
        assert_eq!(e.server.faults().fired_on("auth.sendCode"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_code_delivery_is_handled_without_panicking() {
    bounded(async {
        // Ways a person can receive the code: asked for, saying where it went.
        for (kind, where_) in [
            (SentCodeKind::Sms, "SMS"),
            (SentCodeKind::SmsWord, "SMS"),
            (SentCodeKind::SmsPhrase, "SMS"),
            (SentCodeKind::Call, "phone call"),
            (SentCodeKind::Email, "email"),
            (SentCodeKind::FragmentSms, "Fragment"),
        ] {
            let e = env(LoopbackOptions {
                sent_code: kind,
                ..Default::default()
            })
            .await;
            login_with(
                &e.cfg,
                &e.session,
                &mut script(&[("Phone", PHONE), (where_, LOGIN_CODE)]),
            )
            .await
            .unwrap_or_else(|err| panic!("{kind:?}: {err}"));
        }
        // Ways a server cannot receive it: a clear error with a hint.
        for (kind, says) in [
            (SentCodeKind::FlashCall, "phone call"),
            (SentCodeKind::MissedCall, "phone call"),
            (SentCodeKind::SetUpEmailRequired, "login email"),
            (SentCodeKind::FirebaseSms, "Firebase"),
            (SentCodeKind::PaymentRequired, "payment"),
        ] {
            let e = env(LoopbackOptions {
                sent_code: kind,
                ..Default::default()
            })
            .await;
            let err = login_with(&e.cfg, &e.session, &mut script(&[("Phone", PHONE)]))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(says) && err.contains("hint:"),
                "{kind:?}: {err}"
            );
        }
        // Signed in straight away: nothing more to ask.
        let e = env(LoopbackOptions {
            sent_code: SentCodeKind::Success,
            ..Default::default()
        })
        .await;
        login_with(&e.cfg, &e.session, &mut script(&[("Phone", PHONE)]))
            .await
            .unwrap();
        TelegramStorage::connect(e.cfg.clone()).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_says_which_address_it_could_not_reach() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let session = dir.path().join("tg.session");
        std::fs::write(
            &session,
            format!(r#"{{"version":1,"home_dc":2,"dcs":[{{"id":2,"addr":"127.0.0.1:{port}"}}]}}"#),
        )
        .unwrap();
        let cfg = TelegramConfig::new(1, "hash", session.clone(), dir.path().join("spool"));
        let err = login_with(&cfg, &session, &mut script(&[]))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("could not reach Telegram at 127.0.0.1:{port}"))
                && err.contains("hint: check")
                && err.contains("data centre 2"),
            "{err}"
        );

        // A peer that accepts and hangs up at once (a captive portal, a blocking firewall).
        let rude = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = rude.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = rude.accept().await {
                drop(s);
            }
        });
        std::fs::write(
            &session,
            format!(r#"{{"version":1,"home_dc":2,"dcs":[{{"id":2,"addr":"127.0.0.1:{port}"}}]}}"#),
        )
        .unwrap();
        let err = login_with(&cfg, &session, &mut script(&[]))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("could not reach Telegram at 127.0.0.1:{port}")),
            "{err}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_session_says_to_log_in_again() {
    bounded(async {
        let e = env(LoopbackOptions::default()).await;
        // The file claims a user, but the server does not know the key as signed in.
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&e.session).unwrap()).unwrap();
        json["self_user"] = serde_json::json!({"id": e.server.self_user_id(), "access_hash": 1});
        std::fs::write(&e.session, json.to_string()).unwrap();
        let err = TelegramStorage::connect(e.cfg.clone()).await.err().unwrap();
        assert!(matches!(err, StorageError::Fatal(_)), "{err:?}");
        assert!(err.to_string().contains("login"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sign_in_error_of_the_table_is_explained_or_followed() {
    use storinator_worker::telegram::errors::{Action, KNOWN};
    bounded(async {
        for k in KNOWN.iter().filter(|k| k.action == Action::Login) {
            let e = env(LoopbackOptions::default()).await;
            let message = k
                .name
                .split('_')
                .map(|p| if p == "X" { "4" } else { p })
                .collect::<Vec<_>>()
                .join("_");
            // Errors of the code step come from auth.signIn, the others from auth.sendCode.
            let at_sign_in = k.name.starts_with("PHONE_CODE") || k.name.contains("PASSWORD");
            let method = if at_sign_in {
                "auth.signIn"
            } else {
                "auth.sendCode"
            };
            let fired_before = e.server.faults().fired_on(method);
            e.server
                .faults()
                .on_call(method, 1, Fault::rpc(k.code, message));
            let answers: &[(&str, &str)] = if at_sign_in || k.code == 303 {
                &[("Phone", PHONE), ("code", LOGIN_CODE)]
            } else {
                &[("Phone", PHONE)]
            };
            let res = login_with(&e.cfg, &e.session, &mut script(answers)).await;
            if k.code == 303 {
                // A move to data centre 4: followed, and the sign-in completes there.
                res.unwrap_or_else(|err| panic!("{}: {err}", k.name));
                assert_eq!(
                    e.server.counters().get("dc4:auth.sendCode"),
                    1,
                    "{}",
                    k.name
                );
            } else {
                let err = res.unwrap_err().to_string();
                let name = k.name.trim_end_matches("_X");
                assert!(err.contains(name), "{}: {err}", k.name);
            }
            assert_eq!(
                e.server.faults().fired_on(method),
                fired_before + 1,
                "{}: the scripted fault fired once",
                k.name
            );
        }
    })
    .await;
}
