//! Updates as core.telegram.org/api/updates describes them: the account's pts counts changes
//! to its private chats (Saved Messages here), each channel counts its own; a client that was
//! away asks updates.getDifference and updates.getChannelDifference from the pts it knows and
//! gets what changed since, in slices when there is much.

use grammers_tl_types::{self as tl, Serializable};

use super::server::{Outcome, Server, err};
use super::state::{ChatKey, Event, LogEntry, State};

/// Changes per answer before the server slices a difference.
const DIFF_LIMIT: usize = 100;

/// Records deleted messages in chat `k`'s log; returns the chat's pts after it.
pub(crate) fn log_delete(st: &mut State, k: ChatKey, gone: Vec<i32>) -> i32 {
    if gone.is_empty() {
        return match k {
            ChatKey::Saved => st.pts,
            ChatKey::Channel(_) => st.chats.get(&k).map_or(0, |c| c.pts),
        };
    }
    let n = gone.len() as i32;
    st.log(k, n, Event::Deleted(gone))
}

impl Server {
    pub(crate) fn updates_state(&self) -> tl::enums::updates::State {
        let pts = self.state.lock().unwrap().pts;
        tl::enums::updates::State::State(tl::types::updates::State {
            pts,
            qts: 0,
            date: self.now_unix(),
            seq: 0,
            unread_count: 0,
        })
    }

    /// The messages and other updates of `entries` in chat `k`.
    fn replay(
        &self,
        st: &State,
        k: ChatKey,
        entries: &[LogEntry],
    ) -> (Vec<tl::enums::Message>, Vec<tl::enums::Update>) {
        let mut messages = Vec::new();
        let mut others = Vec::new();
        for e in entries {
            match &e.event {
                Event::New(id) => {
                    // A message deleted since is left out; its deletion follows in the log.
                    if let Some(m) = st.chats.get(&k).and_then(|c| c.msgs.get(id)) {
                        messages.push(self.render_msg(st, k, *id, m));
                    }
                }
                Event::Deleted(ids) => others.push(match k {
                    ChatKey::Saved => {
                        tl::enums::Update::DeleteMessages(tl::types::UpdateDeleteMessages {
                            messages: ids.clone(),
                            pts: e.pts,
                            pts_count: e.count,
                        })
                    }
                    ChatKey::Channel(channel_id) => tl::enums::Update::DeleteChannelMessages(
                        tl::types::UpdateDeleteChannelMessages {
                            channel_id,
                            messages: ids.clone(),
                            pts: e.pts,
                            pts_count: e.count,
                        },
                    ),
                }),
            }
        }
        (messages, others)
    }

    pub(crate) fn get_difference(&self, r: tl::functions::updates::GetDifference) -> Outcome {
        let st = self.state.lock().unwrap();
        let now = self.now_unix();
        let state = |pts| {
            tl::enums::updates::State::State(tl::types::updates::State {
                pts,
                qts: 0,
                date: now,
                seq: 0,
                unread_count: 0,
            })
        };
        let pending: Vec<LogEntry> = st.log.iter().filter(|e| e.pts > r.pts).cloned().collect();
        if pending.is_empty() {
            return Outcome::Reply(
                tl::enums::updates::Difference::Empty(tl::types::updates::DifferenceEmpty {
                    date: now,
                    seq: 0,
                })
                .to_bytes(),
            );
        }
        if let Some(limit) = r.pts_total_limit
            && st.pts - r.pts > limit
        {
            return Outcome::Reply(
                tl::enums::updates::Difference::TooLong(tl::types::updates::DifferenceTooLong {
                    pts: st.pts,
                })
                .to_bytes(),
            );
        }
        let more = pending.len() > DIFF_LIMIT;
        let taken = &pending[..pending.len().min(DIFF_LIMIT)];
        let (new_messages, other_updates) = self.replay(&st, ChatKey::Saved, taken);
        let answer = if more {
            tl::enums::updates::Difference::Slice(tl::types::updates::DifferenceSlice {
                new_messages,
                new_encrypted_messages: vec![],
                other_updates,
                chats: vec![],
                users: self.users(),
                intermediate_state: state(taken.last().map_or(r.pts, |e| e.pts)),
            })
        } else {
            tl::enums::updates::Difference::Difference(tl::types::updates::Difference {
                new_messages,
                new_encrypted_messages: vec![],
                other_updates,
                chats: vec![],
                users: self.users(),
                state: state(st.pts),
            })
        };
        Outcome::Reply(answer.to_bytes())
    }

    pub(crate) fn get_channel_difference(
        &self,
        r: tl::functions::updates::GetChannelDifference,
    ) -> Outcome {
        let k = match self.resolve_input_channel(&r.channel) {
            Ok(k) => k,
            Err(o) => return o,
        };
        if r.pts <= 0 {
            return err(400, "PERSISTENT_TIMESTAMP_EMPTY");
        }
        let st = self.state.lock().unwrap();
        let (pts, log) = st
            .chats
            .get(&k)
            .map_or((0, &[][..]), |c| (c.pts, &c.log[..]));
        if r.pts > pts.max(1) {
            return err(400, "PERSISTENT_TIMESTAMP_INVALID");
        }
        let pending: Vec<LogEntry> = log.iter().filter(|e| e.pts > r.pts).cloned().collect();
        if pending.is_empty() {
            return Outcome::Reply(
                tl::enums::updates::ChannelDifference::Empty(
                    tl::types::updates::ChannelDifferenceEmpty {
                        r#final: true,
                        pts: pts.max(r.pts),
                        timeout: Some(30),
                    },
                )
                .to_bytes(),
            );
        }
        let limit = r.limit.clamp(1, DIFF_LIMIT as i32) as usize;
        let taken = &pending[..pending.len().min(limit)];
        let (new_messages, other_updates) = self.replay(&st, k, taken);
        Outcome::Reply(
            tl::enums::updates::ChannelDifference::Difference(
                tl::types::updates::ChannelDifference {
                    r#final: pending.len() <= limit,
                    pts: taken.last().map_or(r.pts, |e| e.pts),
                    timeout: Some(30),
                    new_messages,
                    other_updates,
                    chats: self.chats_for(k),
                    users: self.users(),
                },
            )
            .to_bytes(),
        )
    }
}
