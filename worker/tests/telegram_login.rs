//! Sign-in through grammers' login API against the loopback Telegram, and the session file it
//! leaves behind.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use storinator_shared::error::StorageError;
use storinator_testkit::mtproto::{LOGIN_CODE, LoopbackOptions, LoopbackTelegram};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage, login_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_code_persists_a_private_session() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let server = LoopbackTelegram::start(LoopbackOptions {
            require_login: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let session = dir.path().join("tg.session");
        server.write_session(&session).unwrap();
        let cfg = TelegramConfig::new(1, "hash", session.clone(), dir.path().join("spool"));

        // Not signed in yet: the backend says what to do.
        let err = TelegramStorage::connect(cfg.clone()).await.err().unwrap();
        assert!(matches!(err, StorageError::Fatal(_)), "{err:?}");
        assert!(err.to_string().contains("login"), "{err}");

        // A wrong code is a clear error and leaves the session signed out.
        let mut wrong = vec!["+10000000000".to_string(), "99999".to_string()].into_iter();
        let e = login_with(&cfg, &session, &mut |_| Ok(wrong.next().unwrap()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not accepted"), "{e}");

        // Whatever the file's mode was, the saved session is private.
        std::fs::set_permissions(&session, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut answers = vec!["+10000000000".to_string(), LOGIN_CODE.to_string()].into_iter();
        let mut asked = Vec::new();
        login_with(&cfg, &session, &mut |q| {
            asked.push(q.to_string());
            Ok(answers.next().unwrap())
        })
        .await
        .unwrap();
        assert_eq!(asked.len(), 2);
        let mode = std::fs::metadata(&session).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&session).unwrap();
        assert!(text.contains(&server.self_user_id().to_string()), "{text}");

        // Signed in: a second login asks nothing, and the storage connects.
        login_with(&cfg, &session, &mut |q| panic!("asked {q:?}"))
            .await
            .unwrap();
        TelegramStorage::connect(cfg).await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_session_says_to_log_in_again() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let server = LoopbackTelegram::start(LoopbackOptions {
            require_login: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let session = dir.path().join("tg.session");
        server.write_session(&session).unwrap();
        // The file claims a user, but the server does not know the key as signed in.
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&session).unwrap()).unwrap();
        json["self_user"] = serde_json::json!({"id": server.self_user_id(), "access_hash": 1});
        std::fs::write(&session, json.to_string()).unwrap();
        let cfg = TelegramConfig::new(1, "hash", session, dir.path().join("spool"));
        let err = TelegramStorage::connect(cfg).await.err().unwrap();
        assert!(matches!(err, StorageError::Fatal(_)), "{err:?}");
        assert!(err.to_string().contains("login"), "{err}");
    })
    .await
    .unwrap();
}
