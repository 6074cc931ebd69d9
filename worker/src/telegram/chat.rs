//! Which chat holds the packs: STORINATOR_STORAGE_CHAT names Saved Messages (empty, `me`), a
//! channel by id (`-100…` or the bare id) or by `@username`. Never by title: anyone can create
//! a channel with the same title and add this account to it, and the uploads would go to that
//! stranger. The channel must be one the account created or administers (with the right to
//! post); that is checked against Telegram every time the storage connects.

use grammers_tl_types as tl;
use storinator_shared::error::StorageError;

/// A channel: its id and this account's access hash for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelRef {
    pub id: i64,
    pub access_hash: i64,
}

/// What STORINATOR_STORAGE_CHAT asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatSpec {
    SavedMessages,
    Id(i64),
    Username(String),
}

fn refuse(spec: &str, why: &str) -> StorageError {
    StorageError::Fatal(format!(
        "STORINATOR_STORAGE_CHAT={spec:?} {why}\nhint: name a channel this account created by its id (-100…) or @username, or leave it empty for Saved Messages; titles are not accepted because anyone can create a channel with the same title and add you to it"
    ))
}

/// Parses STORINATOR_STORAGE_CHAT.
pub fn parse(spec: Option<&str>) -> Result<ChatSpec, StorageError> {
    let raw = spec.unwrap_or("");
    let s = raw.trim();
    if s.is_empty() || ["me", "self", "saved"].contains(&s.to_ascii_lowercase().as_str()) {
        return Ok(ChatSpec::SavedMessages);
    }
    if let Some(name) = s.strip_prefix('@') {
        let ok = (4..=32).contains(&name.len())
            && name.as_bytes()[0].is_ascii_alphabetic()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        return if ok {
            Ok(ChatSpec::Username(name.to_string()))
        } else {
            Err(refuse(raw, "is not a valid @username"))
        };
    }
    let digits = s.strip_prefix("-100").unwrap_or(s);
    match digits.parse::<i64>() {
        Ok(id) if id > 0 => Ok(ChatSpec::Id(id)),
        _ => Err(refuse(raw, "is neither a channel id nor an @username")),
    }
}

/// Checks that `chat` is a channel this account may use as storage: it created it, or
/// administers it with the right to post, and has not left it.
pub fn check(chat: &tl::enums::Chat, spec: &str) -> Result<ChannelRef, StorageError> {
    let c = match chat {
        tl::enums::Chat::Channel(c) => c,
        tl::enums::Chat::ChannelForbidden(_) => {
            return Err(StorageError::Fatal(format!(
                "the account lost access to the storage chat: STORINATOR_STORAGE_CHAT={spec:?} is a channel it was removed or banned from"
            )));
        }
        _ => return Err(refuse(spec, "is not a channel")),
    };
    if c.left {
        return Err(StorageError::Fatal(format!(
            "the account is not a member of the storage channel {:?} (STORINATOR_STORAGE_CHAT={spec:?})",
            c.title
        )));
    }
    let may_post = c.creator
        || matches!(&c.admin_rights, Some(tl::enums::ChatAdminRights::Rights(r)) if r.post_messages || c.megagroup);
    if !may_post {
        return Err(StorageError::Fatal(format!(
            "the account neither created nor administers the channel {:?} (STORINATOR_STORAGE_CHAT={spec:?}): it cannot be the storage chat\nhint: a channel someone else added you to could be read by them; create a private channel with this account and use its id",
            c.title
        )));
    }
    let access_hash = c.access_hash.ok_or_else(|| {
        StorageError::Transient(format!(
            "telegram sent the storage channel {:?} without an access hash",
            c.title
        ))
    })?;
    Ok(ChannelRef {
        id: c.id,
        access_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ids_and_usernames_name_a_channel() {
        assert_eq!(parse(None).unwrap(), ChatSpec::SavedMessages);
        assert_eq!(parse(Some(" me ")).unwrap(), ChatSpec::SavedMessages);
        assert_eq!(
            parse(Some("-1001500000000")).unwrap(),
            ChatSpec::Id(1_500_000_000)
        );
        assert_eq!(
            parse(Some("1500000000")).unwrap(),
            ChatSpec::Id(1_500_000_000)
        );
        assert_eq!(
            parse(Some("@my_backups")).unwrap(),
            ChatSpec::Username("my_backups".into())
        );
        for bad in [
            "storinator-storage",
            "My Backups",
            "@ab",
            "@9lives",
            "-100x",
            "0",
        ] {
            let e = parse(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("titles are not accepted"),
                "{bad}: {e}"
            );
        }
    }
}
