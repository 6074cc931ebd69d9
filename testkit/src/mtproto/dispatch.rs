//! Method routing: counts the call, applies injected faults, the key's authorization (each
//! data centre's key on its own), the account's state (frozen), the message-class budget,
//! then runs the method.

use grammers_tl_types::{self as tl, Deserializable, Identifiable, Serializable};

use super::faults::{Fault, MESSAGE_CLASS};
use super::server::{KeyAuth, Outcome, Server, err};
use super::state::ChatKey;
use super::{tlbuild, wire};

pub(crate) fn decode<T: Deserializable>(q: &[u8]) -> Result<T, Outcome> {
    T::from_bytes(&q[4..]).map_err(|_| err(400, "INPUT_REQUEST_INVALID"))
}

macro_rules! decode_or_return {
    ($t:ty, $q:expr) => {
        match decode::<$t>($q) {
            Ok(v) => v,
            Err(o) => return o,
        }
    };
}

/// Faults a call may carry into its method.
#[derive(Clone, Copy, Default)]
pub(crate) struct Injected {
    pub corrupt_download: bool,
    pub corrupt_upload: bool,
    pub cdn_redirect: bool,
}

use tl::functions as f;

/// Calls a key that is not signed in may make.
const SIGN_IN_CALLS: &[u32] = &[
    f::help::GetConfig::CONSTRUCTOR_ID,
    f::help::GetNearestDc::CONSTRUCTOR_ID,
    f::auth::SendCode::CONSTRUCTOR_ID,
    f::auth::SignIn::CONSTRUCTOR_ID,
    f::auth::CheckPassword::CONSTRUCTOR_ID,
    f::account::GetPassword::CONSTRUCTOR_ID,
    f::auth::ImportAuthorization::CONSTRUCTOR_ID,
];

/// Calls a frozen account may still make (everything else: 420 FROZEN_METHOD_INVALID).
const FROZEN_ALLOWED: &[u32] = &[
    f::help::GetConfig::CONSTRUCTOR_ID,
    f::updates::GetState::CONSTRUCTOR_ID,
    f::users::GetUsers::CONSTRUCTOR_ID,
];

/// Whether a key in state `auth` may make call `id`; the error Telegram gives if not.
fn gate(auth: KeyAuth, id: u32) -> Option<Outcome> {
    let sign_in = SIGN_IN_CALLS.contains(&id);
    match auth {
        KeyAuth::Authorized => None,
        KeyAuth::Duplicated => Some(err(406, "AUTH_KEY_DUPLICATED")),
        KeyAuth::Deactivated => Some(err(401, "USER_DEACTIVATED")),
        _ if sign_in => None,
        KeyAuth::Revoked => Some(err(401, "SESSION_REVOKED")),
        KeyAuth::PasswordNeeded => Some(err(401, "SESSION_PASSWORD_NEEDED")),
        KeyAuth::Unauthorized => Some(err(401, "AUTH_KEY_UNREGISTERED")),
    }
}

pub(crate) async fn run(server: &Server, dc: i32, q: &[u8], gzipped: bool) -> Outcome {
    let id = wire::constructor(q).unwrap_or(0);
    let method = tl::name_for_id(id);
    let n = server.counters.bump(method);
    server.counters.bump(&format!("dc{dc}:{method}"));
    if gzipped {
        server.counters.bump(&format!("gzip:{method}"));
    }
    let mut injected = Injected::default();
    let mut lose_answer = false;
    match server.faults.pick(method, n) {
        None => {}
        Some(Fault::RpcError { code, message }) => return Outcome::Error(code, message),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Hang) => return Outcome::Hang,
        Some(Fault::DropConnection) => return Outcome::Drop,
        Some(Fault::LoseAnswer) => lose_answer = true,
        Some(Fault::CorruptDownload) => injected.corrupt_download = true,
        Some(Fault::CorruptUpload) => injected.corrupt_upload = true,
        Some(Fault::CdnRedirect) => injected.cdn_redirect = true,
    }
    if let Some(refused) = gate(server.key_auth(dc), id) {
        return refused;
    }
    if server.frozen.load(std::sync::atomic::Ordering::Relaxed)
        && !SIGN_IN_CALLS.contains(&id)
        && !FROZEN_ALLOWED.contains(&id)
    {
        return err(420, "FROZEN_METHOD_INVALID");
    }
    if MESSAGE_CLASS.contains(&method)
        && let Some(secs) = server.rate_check()
    {
        return err(420, format!("FLOOD_WAIT_{secs}"));
    }
    let outcome = route(server, dc, id, q, injected).await;
    if lose_answer {
        return Outcome::Drop;
    }
    outcome
}

async fn route(server: &Server, dc: i32, id: u32, q: &[u8], injected: Injected) -> Outcome {
    match id {
        f::help::GetConfig::CONSTRUCTOR_ID => {
            let dcs: Vec<(i32, u16)> = server.dcs.iter().map(|d| (d.id, d.port)).collect();
            Outcome::Reply(tlbuild::config(dc, &dcs, server.now_unix()).to_bytes())
        }
        f::help::GetNearestDc::CONSTRUCTOR_ID => Outcome::Reply(
            tl::enums::NearestDc::Dc(tl::types::NearestDc {
                country: "ZZ".into(),
                this_dc: dc,
                nearest_dc: server.home_dc(),
            })
            .to_bytes(),
        ),
        f::auth::SendCode::CONSTRUCTOR_ID => {
            server.send_code(dc, decode_or_return!(f::auth::SendCode, q))
        }
        f::auth::SignIn::CONSTRUCTOR_ID => {
            server.sign_in(dc, decode_or_return!(f::auth::SignIn, q))
        }
        f::account::GetPassword::CONSTRUCTOR_ID => server.get_password(dc),
        f::auth::CheckPassword::CONSTRUCTOR_ID => {
            server.check_password(dc, decode_or_return!(f::auth::CheckPassword, q))
        }
        f::auth::ExportAuthorization::CONSTRUCTOR_ID => {
            server.export_authorization(dc, decode_or_return!(f::auth::ExportAuthorization, q))
        }
        f::auth::ImportAuthorization::CONSTRUCTOR_ID => {
            server.import_authorization(dc, decode_or_return!(f::auth::ImportAuthorization, q))
        }
        f::updates::GetState::CONSTRUCTOR_ID => Outcome::Reply(server.updates_state().to_bytes()),
        f::updates::GetDifference::CONSTRUCTOR_ID => {
            server.get_difference(decode_or_return!(f::updates::GetDifference, q))
        }
        f::updates::GetChannelDifference::CONSTRUCTOR_ID => {
            server.get_channel_difference(decode_or_return!(f::updates::GetChannelDifference, q))
        }
        f::users::GetUsers::CONSTRUCTOR_ID => {
            let req = decode_or_return!(f::users::GetUsers, q);
            let users: Vec<tl::enums::User> = req
                .id
                .iter()
                .filter(|u| match u {
                    tl::enums::InputUser::UserSelf => true,
                    tl::enums::InputUser::User(u) => u.user_id == server.self_id,
                    _ => false,
                })
                .flat_map(|_| server.users())
                .collect();
            Outcome::Reply(users.to_bytes())
        }
        f::upload::SaveFilePart::CONSTRUCTOR_ID => {
            let req = decode_or_return!(f::upload::SaveFilePart, q);
            server
                .save_part(
                    dc,
                    false,
                    req.file_id,
                    req.file_part,
                    None,
                    req.bytes,
                    injected,
                )
                .await
        }
        f::upload::SaveBigFilePart::CONSTRUCTOR_ID => {
            let req = decode_or_return!(f::upload::SaveBigFilePart, q);
            server
                .save_part(
                    dc,
                    true,
                    req.file_id,
                    req.file_part,
                    Some(req.file_total_parts),
                    req.bytes,
                    injected,
                )
                .await
        }
        f::messages::SendMedia::CONSTRUCTOR_ID => {
            server.send_media(dc, decode_or_return!(f::messages::SendMedia, q))
        }
        f::upload::GetFile::CONSTRUCTOR_ID => {
            server
                .get_file(dc, decode_or_return!(f::upload::GetFile, q), injected)
                .await
        }
        f::messages::GetHistory::CONSTRUCTOR_ID => {
            server.get_history(decode_or_return!(f::messages::GetHistory, q))
        }
        f::messages::Search::CONSTRUCTOR_ID => {
            server.search(decode_or_return!(f::messages::Search, q))
        }
        f::messages::GetMessages::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::messages::GetMessages, q);
            Outcome::Reply(server.get_messages(ChatKey::Saved, &r.id))
        }
        f::channels::GetMessages::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::channels::GetMessages, q);
            match server.resolve_input_channel(&r.channel) {
                Ok(k) => Outcome::Reply(server.get_messages(k, &r.id)),
                Err(o) => o,
            }
        }
        f::messages::DeleteMessages::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::messages::DeleteMessages, q);
            server.delete(ChatKey::Saved, &r.id)
        }
        f::channels::DeleteMessages::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::channels::DeleteMessages, q);
            match server.resolve_input_channel(&r.channel) {
                Ok(k) => server.delete(k, &r.id),
                Err(o) => o,
            }
        }
        f::messages::GetDialogs::CONSTRUCTOR_ID => Outcome::Reply(server.dialogs()),
        f::channels::GetChannels::CONSTRUCTOR_ID => {
            server.get_channels(decode_or_return!(f::channels::GetChannels, q))
        }
        f::contacts::ResolveUsername::CONSTRUCTOR_ID => {
            server.resolve_username(decode_or_return!(f::contacts::ResolveUsername, q))
        }
        _ => err(
            400,
            format!("METHOD_NOT_IMPLEMENTED_{}", tl::name_for_id(id)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_gated_by_their_authorization() {
        let send = f::messages::SendMedia::CONSTRUCTOR_ID;
        let code = f::auth::SendCode::CONSTRUCTOR_ID;
        let name = |o: Option<Outcome>| match o {
            Some(Outcome::Error(c, m)) => format!("{c} {m}"),
            Some(_) => "other".into(),
            None => "ok".into(),
        };
        assert_eq!(name(gate(KeyAuth::Authorized, send)), "ok");
        assert_eq!(
            name(gate(KeyAuth::Unauthorized, send)),
            "401 AUTH_KEY_UNREGISTERED"
        );
        assert_eq!(name(gate(KeyAuth::Unauthorized, code)), "ok");
        assert_eq!(name(gate(KeyAuth::Revoked, send)), "401 SESSION_REVOKED");
        assert_eq!(name(gate(KeyAuth::Revoked, code)), "ok");
        assert_eq!(
            name(gate(KeyAuth::Deactivated, code)),
            "401 USER_DEACTIVATED"
        );
        assert_eq!(
            name(gate(KeyAuth::Duplicated, code)),
            "406 AUTH_KEY_DUPLICATED"
        );
        assert_eq!(
            name(gate(KeyAuth::PasswordNeeded, send)),
            "401 SESSION_PASSWORD_NEEDED"
        );
    }
}
