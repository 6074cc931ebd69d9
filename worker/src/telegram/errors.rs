//! Every Telegram error the worker knows and what it does about each: one table, used by the
//! storage backend and the login, listed in the README's troubleshooting section (a test
//! checks that the two agree).
//!
//! Names are written as Telegram documents them, `X` standing for the number some carry
//! (`FLOOD_WAIT_X`). Code 420 is a wait only for `*_WAIT_X` errors that carry a number; any
//! other 420 (FROZEN_METHOD_INVALID, ...) fails the job with an explanation instead of
//! looping on it.

use grammers_mtsender::RpcError;

/// What the worker does when Telegram answers with an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Pause that class of calls for exactly X seconds, then retry; never fails a job.
    Wait,
    /// Telegram had a problem of its own: retry with the scheduler's bounded backoff.
    Retry,
    /// The uploaded parts are gone or unusable: upload the pack again from its first part
    /// (a bounded number of times).
    Reupload,
    /// Fetch the message again for a fresh file reference, then read again.
    RefreshReference,
    /// The document lives on data centre X: carry the authorization there and read there.
    MigrateDc,
    /// The same send (same random_id) went through before: find that message.
    FindEarlierSend,
    /// The saved session is no longer valid: fail with "run `storinator-worker login`".
    SessionInvalid,
    /// The account can no longer use the storage chat: fail, saying so.
    AccessLost,
    /// The object is not in storage any more.
    NotFound,
    /// Handled by `storinator-worker login` (asks again, moves data centre, explains).
    Login,
    /// Fail with the row's explanation: retrying would repeat it.
    Fatal,
}

/// One row of the table.
#[derive(Debug)]
pub struct Known {
    /// The rpc_error code, or 0 for any.
    pub code: i32,
    /// Telegram's name, `X` for a number.
    pub name: &'static str,
    pub action: Action,
    /// What it means, for people (used in error messages and the README).
    pub meaning: &'static str,
}

const fn row(code: i32, name: &'static str, action: Action, meaning: &'static str) -> Known {
    Known {
        code,
        name,
        action,
        meaning,
    }
}

use Action::*;

/// Every error the worker knows. Order matters only for readability; names are unique.
pub const KNOWN: &[Known] = &[
    // Waits (420 with a number).
    row(
        420,
        "FLOOD_WAIT_X",
        Wait,
        "too many calls: Telegram asks to wait X seconds",
    ),
    row(
        420,
        "FLOOD_PREMIUM_WAIT_X",
        Wait,
        "Telegram is limiting this account's upload speed (free accounts are slowed down after a volume; Premium lifts it): the job goes on, slower",
    ),
    row(
        420,
        "SLOWMODE_WAIT_X",
        Wait,
        "slow mode is on in the storage chat",
    ),
    row(
        420,
        "FLOOD_TEST_PHONE_WAIT_X",
        Wait,
        "too many calls from a test number",
    ),
    // Other 420s are not waits.
    row(
        420,
        "FROZEN_METHOD_INVALID",
        Fatal,
        "this Telegram account is frozen: Telegram limited it and it cannot store anything until that is lifted (see the notice in the official app)",
    ),
    // Telegram's own trouble.
    row(500, "RPC_CALL_FAIL", Retry, "Telegram failed internally"),
    row(
        500,
        "INTERDC_X_CALL_ERROR",
        Retry,
        "Telegram's data centres could not talk to each other",
    ),
    row(-503, "Timeout", Retry, "Telegram did not answer in time"),
    row(0, "TIMEOUT", Retry, "Telegram timed out"),
    // The session.
    row(
        401,
        "AUTH_KEY_UNREGISTERED",
        SessionInvalid,
        "the session is not signed in (or was logged out)",
    ),
    row(
        401,
        "SESSION_REVOKED",
        SessionInvalid,
        "the session was terminated from another device",
    ),
    row(
        401,
        "SESSION_EXPIRED",
        SessionInvalid,
        "the session expired",
    ),
    row(
        401,
        "AUTH_KEY_PERM_EMPTY",
        SessionInvalid,
        "the session has no permanent key",
    ),
    row(
        401,
        "SESSION_PASSWORD_NEEDED",
        SessionInvalid,
        "the sign-in did not finish (the two-step verification password is due)",
    ),
    row(
        406,
        "AUTH_KEY_DUPLICATED",
        SessionInvalid,
        "the same session was used from two places at once and Telegram dropped it",
    ),
    row(
        401,
        "USER_DEACTIVATED",
        Fatal,
        "the Telegram account was deleted",
    ),
    row(
        401,
        "USER_DEACTIVATED_BAN",
        Fatal,
        "Telegram banned the account",
    ),
    // The storage chat.
    row(
        403,
        "CHAT_WRITE_FORBIDDEN",
        AccessLost,
        "the account may no longer post in the storage chat",
    ),
    row(
        400,
        "CHANNEL_PRIVATE",
        AccessLost,
        "the account is no longer in the storage channel (left, removed or banned)",
    ),
    row(
        400,
        "CHANNEL_INVALID",
        AccessLost,
        "the storage channel is not known to this account (deleted, or the session's access hash is stale)",
    ),
    row(
        400,
        "CHAT_ADMIN_REQUIRED",
        AccessLost,
        "the account is no longer an administrator of the storage channel",
    ),
    row(
        400,
        "USER_BANNED_IN_CHANNEL",
        AccessLost,
        "the account is banned from posting in the storage channel",
    ),
    row(
        403,
        "MESSAGE_DELETE_FORBIDDEN",
        AccessLost,
        "the account may no longer delete in the storage chat",
    ),
    row(
        400,
        "PEER_ID_INVALID",
        AccessLost,
        "the storage chat is not known to this account",
    ),
    // Uploads.
    row(
        400,
        "FILE_PART_X_MISSING",
        Reupload,
        "uploaded parts expired before the pack was sent",
    ),
    row(
        400,
        "MD5_CHECKSUM_INVALID",
        Reupload,
        "the uploaded bytes do not match their checksum",
    ),
    row(
        400,
        "MEDIA_EMPTY",
        Reupload,
        "Telegram found no usable file in the upload",
    ),
    row(
        400,
        "FILE_PARTS_INVALID",
        Fatal,
        "Telegram refused the number of parts of an upload (a storinator bug: retrying would repeat it)",
    ),
    row(
        400,
        "FILE_PART_SIZE_INVALID",
        Fatal,
        "Telegram refused the size of an upload's parts (a storinator bug: retrying would repeat it)",
    ),
    row(
        400,
        "FILE_PART_TOO_BIG",
        Fatal,
        "an upload part is over 512 KiB (a storinator bug)",
    ),
    row(
        400,
        "FILE_PART_EMPTY",
        Fatal,
        "an upload part is empty (a storinator bug)",
    ),
    row(
        400,
        "FILE_PART_INVALID",
        Fatal,
        "an upload part number is out of range (a storinator bug)",
    ),
    row(
        500,
        "RANDOM_ID_DUPLICATE",
        FindEarlierSend,
        "this pack was sent before (the answer was lost, or the worker restarted)",
    ),
    // Downloads.
    row(
        303,
        "FILE_MIGRATE_X",
        MigrateDc,
        "the document lives on data centre X",
    ),
    row(
        400,
        "FILE_REFERENCE_EXPIRED",
        RefreshReference,
        "the document's file reference expired",
    ),
    row(
        400,
        "FILE_REFERENCE_INVALID",
        RefreshReference,
        "the document's file reference is not valid any more",
    ),
    row(
        406,
        "FILEREF_UPGRADE_NEEDED",
        RefreshReference,
        "the read carried no file reference",
    ),
    row(
        400,
        "FILE_ID_INVALID",
        RefreshReference,
        "the document changed since the message was read",
    ),
    row(
        400,
        "MESSAGE_ID_INVALID",
        NotFound,
        "the message holding the object is gone",
    ),
    row(
        400,
        "LOCATION_INVALID",
        Fatal,
        "Telegram refused the file location (a storinator bug)",
    ),
    row(
        400,
        "OFFSET_INVALID",
        Fatal,
        "Telegram refused a read offset (a storinator bug)",
    ),
    row(
        400,
        "LIMIT_INVALID",
        Fatal,
        "Telegram refused a read size (a storinator bug)",
    ),
    row(
        400,
        "DC_ID_INVALID",
        Fatal,
        "Telegram does not know the data centre a document claims to be on",
    ),
    row(
        400,
        "AUTH_BYTES_INVALID",
        Fatal,
        "Telegram refused to carry the authorization to another data centre",
    ),
    // Connections.
    row(
        400,
        "CONNECTION_LAYER_INVALID",
        Fatal,
        "Telegram does not speak this client's API layer: update storinator",
    ),
    row(
        400,
        "CONNECTION_NOT_INITED",
        Fatal,
        "a connection was used before it was initialised (a storinator bug)",
    ),
    // The storage chat setting.
    row(
        400,
        "USERNAME_NOT_OCCUPIED",
        Fatal,
        "no chat has this @username",
    ),
    row(
        400,
        "USERNAME_INVALID",
        Fatal,
        "this is not a valid @username",
    ),
    // Signing in (storinator-worker login).
    row(
        303,
        "PHONE_MIGRATE_X",
        Login,
        "the phone number belongs to data centre X: sign-in moves there",
    ),
    row(
        303,
        "NETWORK_MIGRATE_X",
        Login,
        "sign in through data centre X",
    ),
    row(
        303,
        "USER_MIGRATE_X",
        Login,
        "the account lives on data centre X: sign in again to move there",
    ),
    row(400, "PHONE_CODE_INVALID", Login, "the login code is wrong"),
    row(
        400,
        "PHONE_CODE_EXPIRED",
        Login,
        "the login code expired: request a new one",
    ),
    row(400, "PHONE_CODE_EMPTY", Login, "no login code was given"),
    row(
        400,
        "PHONE_CODE_HASH_EMPTY",
        Login,
        "the login attempt lost track of its code request",
    ),
    row(
        400,
        "PHONE_NUMBER_INVALID",
        Login,
        "the phone number is not valid (international format, with the country code)",
    ),
    row(
        400,
        "PHONE_NUMBER_BANNED",
        Login,
        "Telegram banned this phone number",
    ),
    row(
        400,
        "PHONE_NUMBER_UNOCCUPIED",
        Login,
        "no Telegram account uses this phone number",
    ),
    row(
        400,
        "PHONE_NUMBER_FLOOD",
        Login,
        "too many login codes were requested for this number",
    ),
    row(
        400,
        "PASSWORD_HASH_INVALID",
        Login,
        "the two-step verification password is wrong",
    ),
    row(
        400,
        "SRP_ID_INVALID",
        Login,
        "the two-step verification attempt expired: try again",
    ),
];

/// Telegram's form of a row name as grammers parses it: numbers are taken out (and given as
/// the value), so `FLOOD_WAIT_X` is `FLOOD_WAIT` with a value.
fn parsed_form(name: &str) -> (String, bool) {
    let parts: Vec<&str> = name.split('_').collect();
    let has_x = parts.contains(&"X");
    let kept: Vec<&str> = parts.into_iter().filter(|p| *p != "X").collect();
    (kept.join("_"), has_x)
}

/// The row for `e`, if the worker knows it.
pub fn known(e: &RpcError) -> Option<&'static Known> {
    KNOWN.iter().find(|k| {
        let (name, has_x) = parsed_form(k.name);
        // A name may hold digits of its own (MD5_...), which grammers also reads as a value.
        name == e.name && (k.code == 0 || k.code == e.code) && (!has_x || e.value.is_some())
    })
}

/// What to do about `e`: the table's row, or a rule for codes the table does not list.
pub fn classify(e: &RpcError) -> Action {
    if e.code == 420 {
        // Only a *_WAIT_X with its number is a wait.
        return if e.name.ends_with("_WAIT") && e.value.is_some() {
            Wait
        } else {
            known(e).map_or(Fatal, |k| k.action)
        };
    }
    if let Some(k) = known(e) {
        return k.action;
    }
    match e.code {
        401 => SessionInvalid,
        500.. | -503 => Retry,
        _ => Fatal,
    }
}

/// A sentence about `e` for people: its meaning from the table, or what its code says.
pub fn describe(e: &RpcError) -> String {
    let row = known(e);
    let numbered = row.is_none_or(|k| parsed_form(k.name).1);
    let name = match e.value {
        Some(v) if numbered => format!("{} ({v})", e.name),
        _ => e.name.clone(),
    };
    match row {
        Some(k) => {
            let n = e.value.map_or("X".into(), |v| v.to_string());
            format!("{}: {}", name, k.meaning.replace(" X", &format!(" {n}")))
        }
        None if e.code == 420 => format!(
            "{name}: telegram refused with code 420, which is not a wait (only *_WAIT_X errors are)"
        ),
        None => format!("{name} (code {})", e.code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(code: i32, message: &str) -> RpcError {
        RpcError::from(grammers_tl_types::types::RpcError {
            error_code: code,
            error_message: message.into(),
        })
    }

    #[test]
    fn only_waits_with_a_number_are_waits() {
        assert_eq!(classify(&rpc(420, "FLOOD_WAIT_31")), Wait);
        assert_eq!(classify(&rpc(420, "FLOOD_PREMIUM_WAIT_7")), Wait);
        assert_eq!(classify(&rpc(420, "SLOWMODE_WAIT_60")), Wait);
        // A wait Telegram adds one day is still a wait.
        assert_eq!(classify(&rpc(420, "SOMETHING_NEW_WAIT_5")), Wait);
        assert_eq!(classify(&rpc(420, "FROZEN_METHOD_INVALID")), Fatal);
        assert_eq!(
            classify(&rpc(420, "FLOOD_WAIT")),
            Fatal,
            "no number, no wait"
        );
        assert_eq!(classify(&rpc(420, "SOMETHING_ELSE")), Fatal);
        assert!(describe(&rpc(420, "SOMETHING_ELSE")).contains("not a wait"));
        assert!(describe(&rpc(420, "FROZEN_METHOD_INVALID")).contains("frozen"));
    }

    #[test]
    fn sessions_access_files_and_transients_are_classified() {
        for (code, msg, want) in [
            (401, "AUTH_KEY_UNREGISTERED", SessionInvalid),
            (401, "SESSION_REVOKED", SessionInvalid),
            (406, "AUTH_KEY_DUPLICATED", SessionInvalid),
            (401, "SOMETHING_NEW", SessionInvalid),
            (403, "CHAT_WRITE_FORBIDDEN", AccessLost),
            (400, "CHANNEL_PRIVATE", AccessLost),
            (400, "CHANNEL_INVALID", AccessLost),
            (406, "FILEREF_UPGRADE_NEEDED", RefreshReference),
            (400, "MEDIA_EMPTY", Reupload),
            (400, "FILE_PARTS_INVALID", Fatal),
            (400, "FILE_PART_SIZE_INVALID", Fatal),
            (400, "FILE_PART_3_MISSING", Reupload),
            (400, "MD5_CHECKSUM_INVALID", Reupload),
            (303, "FILE_MIGRATE_4", MigrateDc),
            (303, "PHONE_MIGRATE_5", Login),
            (500, "RANDOM_ID_DUPLICATE", FindEarlierSend),
            (500, "INTERDC_2_CALL_ERROR", Retry),
            (500, "NO_WORKERS_RUNNING", Retry),
            (-503, "Timeout", Retry),
            (400, "SOMETHING_UNHEARD_OF", Fatal),
        ] {
            assert_eq!(classify(&rpc(code, msg)), want, "{code} {msg}");
        }
        assert_eq!(
            describe(&rpc(303, "FILE_MIGRATE_4")),
            "FILE_MIGRATE (4): the document lives on data centre 4"
        );
    }

    #[test]
    fn every_row_is_reachable_and_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for k in KNOWN {
            assert!(seen.insert(k.name), "{} twice", k.name);
            let message = k
                .name
                .split('_')
                .map(|p| if p == "X" { "3" } else { p })
                .collect::<Vec<_>>()
                .join("_");
            let e = rpc(if k.code == 0 { 400 } else { k.code }, &message);
            assert_eq!(
                known(&e).map(|r| r.name),
                Some(k.name),
                "{} parses back to its row",
                k.name
            );
        }
    }

    #[test]
    fn the_readme_lists_every_row() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("### Telegram errors")
            .nth(1)
            .expect("README has a Telegram errors section");
        for k in KNOWN {
            assert!(
                section.contains(&format!("`{}`", k.name)),
                "README's Telegram errors table lacks {}",
                k.name
            );
        }
    }
}
