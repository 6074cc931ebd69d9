//! The storage chat is named by id or @username, never by title, and must be a channel the
//! account created or administers: a stranger who adds the account to a channel with the same
//! title (or invites it to theirs) must not receive the uploads.

mod telegram_support;

use std::time::Duration;

use storinator_shared::storage::Storage;
use storinator_testkit::mtproto::{ChannelRole, ChannelSpec, LoopbackOptions, LoopbackTelegram};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage};

async fn connect(
    server: &LoopbackTelegram,
    dir: &std::path::Path,
    chat: &str,
) -> Result<TelegramStorage, String> {
    let session = dir.join(format!("{}.session", chat.replace(['@', '-'], "_")));
    server.write_session(&session).unwrap();
    let mut cfg = TelegramConfig::new(1, "x", session, dir.join("spool"));
    cfg.request_timeout = Duration::from_secs(5);
    cfg.storage_chat = Some(chat.to_string());
    TelegramStorage::connect(cfg)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_own_channels_named_by_id_or_username_hold_packs() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let server = LoopbackTelegram::start(LoopbackOptions {
            channels: vec![
                ChannelSpec::new("backups", ChannelRole::Creator).username("my_backups"),
                ChannelSpec::new("team", ChannelRole::Admin),
                // A stranger's channel with the same title, which the account was added to
                // later; and a public one it merely follows.
                ChannelSpec::new("backups", ChannelRole::Member),
                ChannelSpec::new("news", ChannelRole::Member).username("some_news"),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
        let ch = server.channels();
        let (own, team, stranger, news) = (&ch[0], &ch[1], &ch[2], &ch[3]);
        assert_eq!(
            (own.title.as_str(), stranger.title.as_str()),
            ("backups", "backups")
        );

        // A title is refused outright, whichever channel it would have matched.
        let e = connect(&server, dir.path(), "backups").await.err().unwrap();
        assert!(e.contains("titles are not accepted"), "{e}");

        // The stranger's channel, by id: refused.
        let e = connect(&server, dir.path(), &format!("-100{}", stranger.id))
            .await
            .err()
            .unwrap();
        assert!(e.contains("neither created nor administers"), "{e}");
        // A public channel it follows, by @username: refused.
        let e = connect(&server, dir.path(), "@some_news")
            .await
            .err()
            .unwrap();
        assert!(e.contains("neither created nor administers"), "{e}");
        let _ = news;

        // Its own channel by @username, and one it administers by id: accepted.
        let s = connect(&server, dir.path(), "@my_backups").await.unwrap();
        assert_eq!(s.describe(), format!("telegram:channel -100{}", own.id));
        telegram_support::put(&s, "aa.enc", b"pack").await;
        let s = connect(&server, dir.path(), &format!("-100{}", team.id))
            .await
            .unwrap();
        telegram_support::put(&s, "bb.enc", b"pack").await;
        let docs = server.documents();
        assert_eq!(docs.len(), 2);
        assert!(
            docs.iter()
                .all(|d| d.0 != format!("channel:{}", stranger.id)),
            "{docs:?}"
        );

        // Every start checks again: demoted to a subscriber, the channel is refused.
        server.set_channel_role(team.id, ChannelRole::Member);
        let e = connect(&server, dir.path(), &format!("-100{}", team.id))
            .await
            .err()
            .unwrap();
        assert!(e.contains("neither created nor administers"), "{e}");
        let e = connect(&server, dir.path(), "@nobody_here")
            .await
            .err()
            .unwrap();
        assert!(e.contains("USERNAME_NOT_OCCUPIED"), "{e}");
    })
    .await
    .unwrap();
}
