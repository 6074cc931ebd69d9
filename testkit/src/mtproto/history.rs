//! History and lookups: paging as core.telegram.org/api/offsets documents it, search (whose
//! index lags behind new messages), messages by id, deletion, dialogs, channels by id and by
//! @username.

use grammers_tl_types::{self as tl, Serializable};
use tokio::time::Instant;

/// Most messages one messages.deleteMessages / channels.deleteMessages call deletes.
const MAX_DELETE_IDS: usize = 100;

use super::server::{Outcome, Server, err};
use super::state::{Chat, ChatKey, Msg, State};
use super::{ChannelRole, tlbuild, updates};

/// Paging arguments of messages.getHistory and messages.search.
pub(crate) struct Paging {
    pub offset_id: i32,
    pub offset_date: i32,
    pub add_offset: i32,
    pub limit: i32,
    pub max_id: i32,
    pub min_id: i32,
}

/// The slice of `list` (newest first) a request asks for, as offsets.md defines it: the
/// offset is offsetFromID(offset_id) + add_offset, where offsetFromID counts the results up to
/// offset_id inclusive (offset_date, when no offset_id is given, counts the results sent at or
/// after it); `limit` results from there, negative offsets reaching towards newer ones;
/// max_id and min_id then filter what the slice holds. Returns the slice and its position.
pub(crate) fn slice(list: &[(i32, i32)], p: &Paging) -> (Vec<usize>, usize) {
    let base = if p.offset_id > 0 {
        list.iter().filter(|(id, _)| *id >= p.offset_id).count() as i64
    } else if p.offset_date > 0 {
        list.iter().filter(|(_, d)| *d >= p.offset_date).count() as i64
    } else {
        0
    };
    let limit = if p.limit <= 0 { 20 } else { p.limit.min(100) } as i64;
    let start = base + i64::from(p.add_offset);
    let end = (start + limit).clamp(0, list.len() as i64) as usize;
    let start = start.clamp(0, list.len() as i64) as usize;
    let picked = (start..end.max(start))
        .filter(|&i| {
            let id = list[i].0;
            (p.max_id <= 0 || id < p.max_id) && id > p.min_id
        })
        .collect();
    (picked, start)
}

impl Server {
    fn page(&self, k: ChatKey, p: &Paging, filter: impl Fn(&State, &Msg) -> bool) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        let empty = Chat::default();
        let chat = st.chats.get(&k).unwrap_or(&empty);
        let matching: Vec<(i32, &Msg)> = chat
            .msgs
            .iter()
            .rev()
            .filter(|(_, m)| filter(&st, m))
            .map(|(id, m)| (*id, m))
            .collect();
        let keys: Vec<(i32, i32)> = matching.iter().map(|(id, m)| (*id, m.date)).collect();
        let (picked, position) = slice(&keys, p);
        let count = matching.len() as i32;
        let page: Vec<_> = picked
            .into_iter()
            .map(|i| self.render_msg(&st, k, matching[i].0, matching[i].1))
            .collect();
        let offset_id_offset =
            (p.offset_id > 0 || p.offset_date > 0 || p.add_offset != 0).then_some(position as i32);
        let users = self.users();
        let chats = self.chats_for(k);
        match k {
            ChatKey::Channel(_) => tl::enums::messages::Messages::ChannelMessages(
                tl::types::messages::ChannelMessages {
                    inexact: false,
                    pts: chat.pts,
                    count,
                    offset_id_offset,
                    messages: page,
                    topics: vec![],
                    chats,
                    users,
                },
            )
            .to_bytes(),
            ChatKey::Saved if (page.len() as i32) < count => {
                tl::enums::messages::Messages::Slice(tl::types::messages::MessagesSlice {
                    inexact: false,
                    count,
                    next_rate: None,
                    offset_id_offset,
                    search_flood: None,
                    messages: page,
                    topics: vec![],
                    chats,
                    users,
                })
                .to_bytes()
            }
            ChatKey::Saved => {
                tl::enums::messages::Messages::Messages(tl::types::messages::Messages {
                    messages: page,
                    topics: vec![],
                    chats,
                    users,
                })
                .to_bytes()
            }
        }
    }

    pub(crate) fn get_history(&self, r: tl::functions::messages::GetHistory) -> Outcome {
        match self.resolve_peer(&r.peer) {
            Ok(k) => Outcome::Reply(self.page(
                k,
                &Paging {
                    offset_id: r.offset_id,
                    offset_date: r.offset_date,
                    add_offset: r.add_offset,
                    limit: r.limit,
                    max_id: r.max_id,
                    min_id: r.min_id,
                },
                |_, _| true,
            )),
            Err(o) => o,
        }
    }

    /// messages.search over names and captions. Messages younger than the index lag are not
    /// found yet, as on Telegram right after a send.
    pub(crate) fn search(&self, r: tl::functions::messages::Search) -> Outcome {
        let needle = r.q.to_lowercase();
        let docs_only = matches!(
            r.filter,
            tl::enums::MessagesFilter::InputMessagesFilterDocument
        );
        let k = match self.resolve_peer(&r.peer) {
            Ok(k) => k,
            Err(o) => return o,
        };
        let now = Instant::now();
        let (min_date, max_date) = (r.min_date, r.max_date);
        Outcome::Reply(self.page(
            k,
            &Paging {
                offset_id: r.offset_id,
                offset_date: 0,
                add_offset: r.add_offset,
                limit: r.limit,
                max_id: r.max_id,
                min_id: r.min_id,
            },
            move |st, m| {
                if m.indexed_at > now
                    || (min_date > 0 && m.date < min_date)
                    || (max_date > 0 && m.date > max_date)
                {
                    return false;
                }
                let name = m
                    .doc
                    .and_then(|d| st.docs.get(&d))
                    .map(|d| d.name.to_lowercase());
                if docs_only && name.is_none() {
                    return false;
                }
                needle.is_empty()
                    || m.text.to_lowercase().contains(&needle)
                    || name.is_some_and(|n| n.contains(&needle))
            },
        ))
    }

    pub(crate) fn get_messages(&self, k: ChatKey, ids: &[tl::enums::InputMessage]) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        let msgs = ids
            .iter()
            .map(|im| {
                let id = match im {
                    tl::enums::InputMessage::Id(i) => i.id,
                    _ => 0,
                };
                match st.chats.get(&k).and_then(|c| c.msgs.get(&id)) {
                    Some(m) => self.render_msg(&st, k, id, m),
                    None => {
                        tl::enums::Message::Empty(tl::types::MessageEmpty { id, peer_id: None })
                    }
                }
            })
            .collect();
        let users = self.users();
        let chats = self.chats_for(k);
        match k {
            ChatKey::Channel(_) => {
                let pts = st.chats.get(&k).map_or(0, |c| c.pts);
                tl::enums::messages::Messages::ChannelMessages(
                    tl::types::messages::ChannelMessages {
                        inexact: false,
                        pts,
                        count: ids.len() as i32,
                        offset_id_offset: None,
                        messages: msgs,
                        topics: vec![],
                        chats,
                        users,
                    },
                )
                .to_bytes()
            }
            ChatKey::Saved => {
                tl::enums::messages::Messages::Messages(tl::types::messages::Messages {
                    messages: msgs,
                    topics: vec![],
                    chats,
                    users,
                })
                .to_bytes()
            }
        }
    }

    pub(crate) fn delete(&self, k: ChatKey, ids: &[i32]) -> Outcome {
        if let ChatKey::Channel(id) = k
            && self
                .channel(id)
                .is_some_and(|c| c.role == ChannelRole::Member)
        {
            return err(403, "MESSAGE_DELETE_FORBIDDEN");
        }
        // Telegram deletes at most 100 messages per call ("a server-side limit for one-time
        // forward or delete messages", tdesktop#2045): ids past the first 100 are left alone,
        // and the answer counts only what went, so a client that sends more leaks messages.
        let ids = &ids[..ids.len().min(MAX_DELETE_IDS)];
        let mut st = self.state.lock().unwrap();
        let gone = st.delete_msgs(k, ids);
        let n = gone.len() as i32;
        let pts = updates::log_delete(&mut st, k, gone);
        self.touch();
        Outcome::Reply(
            tl::enums::messages::AffectedMessages::Messages(
                tl::types::messages::AffectedMessages { pts, pts_count: n },
            )
            .to_bytes(),
        )
    }

    /// All dialogs in one answer (the loopback account has a handful): Saved Messages and
    /// each channel it is in, with their top messages.
    pub(crate) fn dialogs(&self) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        let mut keys = vec![ChatKey::Saved];
        keys.extend(
            self.channels
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.role != ChannelRole::Left)
                .map(|c| ChatKey::Channel(c.id)),
        );
        let mut dialogs = Vec::new();
        let mut messages = Vec::new();
        for k in keys {
            let top = st
                .chats
                .get(&k)
                .and_then(|c| c.msgs.iter().next_back())
                .map(|(id, m)| (*id, m));
            if let Some((id, m)) = top {
                messages.push(self.render_msg(&st, k, id, m));
            }
            dialogs.push(tlbuild::dialog(
                self.peer_of(k),
                top.map_or(0, |(id, _)| id),
                match k {
                    ChatKey::Saved => None,
                    ChatKey::Channel(_) => Some(st.chats.get(&k).map_or(0, |c| c.pts)),
                },
            ));
        }
        tl::enums::messages::Dialogs::Dialogs(tl::types::messages::Dialogs {
            dialogs,
            messages,
            chats: self.member_chats(),
            users: self.users(),
        })
        .to_bytes()
    }

    pub(crate) fn get_channels(&self, r: tl::functions::channels::GetChannels) -> Outcome {
        let mut chats = Vec::new();
        for c in &r.id {
            match self.resolve_input_channel(c) {
                Ok(k) => chats.extend(self.chats_for(k)),
                Err(o) => return o,
            }
        }
        Outcome::Reply(
            tl::enums::messages::Chats::Chats(tl::types::messages::Chats { chats }).to_bytes(),
        )
    }

    pub(crate) fn resolve_username(&self, r: tl::functions::contacts::ResolveUsername) -> Outcome {
        let want = r.username.trim_start_matches('@').to_ascii_lowercase();
        let found = self
            .channels
            .lock()
            .unwrap()
            .iter()
            .find(|c| {
                c.username
                    .as_deref()
                    .is_some_and(|u| u.to_ascii_lowercase() == want)
            })
            .cloned();
        match found {
            Some(c) => Outcome::Reply(
                tl::enums::contacts::ResolvedPeer::Peer(tl::types::contacts::ResolvedPeer {
                    peer: tl::enums::Peer::Channel(tl::types::PeerChannel { channel_id: c.id }),
                    chats: vec![tlbuild::channel(&c)],
                    users: vec![],
                })
                .to_bytes(),
            ),
            None => err(400, "USERNAME_NOT_OCCUPIED"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[(i32, i32)], p: Paging) -> Vec<i32> {
        slice(list, &p).0.into_iter().map(|i| list[i].0).collect()
    }

    fn paging(offset_id: i32, add_offset: i32, limit: i32) -> Paging {
        Paging {
            offset_id,
            offset_date: 0,
            add_offset,
            limit,
            max_id: 0,
            min_id: 0,
        }
    }

    #[test]
    fn offsets_follow_the_documented_formula() {
        // Ids 20..=1 newest first, one message per 10 seconds.
        let list: Vec<(i32, i32)> = (1..=20).rev().map(|i| (i, 1000 + i * 10)).collect();
        // Older than 15.
        assert_eq!(ids(&list, paging(15, 0, 3)), vec![14, 13, 12]);
        // Towards newer ones: offsetFromID counts 15 itself, so 15 is the last of them.
        assert_eq!(ids(&list, paging(15, -3, 3)), vec![17, 16, 15]);
        // Around 15.
        assert_eq!(ids(&list, paging(15, -2, 4)), vec![16, 15, 14, 13]);
        // A negative offset past the newest message yields what there is.
        assert_eq!(ids(&list, paging(19, -5, 5)), vec![20, 19]);
        // offset_date: sent before 1105, i.e. ids up to 10.
        let by_date = Paging {
            offset_date: 1105,
            ..paging(0, 0, 3)
        };
        assert_eq!(ids(&list, by_date), vec![10, 9, 8]);
        // max_id and min_id filter the slice after it was cut.
        let filtered = Paging {
            max_id: 13,
            min_id: 11,
            ..paging(15, 0, 5)
        };
        assert_eq!(ids(&list, filtered), vec![12]);
    }
}
