//! Signing in: login codes (delivery types, expiry, the phone's data centre), two-step
//! verification (SRP, see `srp`), and carrying an authorization to another data centre
//! (auth.exportAuthorization on the home one, auth.importAuthorization on the other).

use std::collections::HashMap;

use grammers_tl_types::{self as tl, Serializable};

use super::server::{KeyAuth, Outcome, Server, err, rnd_bytes};
use super::{SentCodeKind, srp, tlbuild};

/// Sign-in state of the account.
#[derive(Default)]
pub(crate) struct Login {
    /// Codes sent, by phone_code_hash.
    codes: HashMap<String, Code>,
    /// The password's verifier (made on first use: PBKDF2 takes a moment).
    verifier: Option<srp::Verifier>,
    /// The challenge last handed to each data centre's key; one check consumes it.
    challenges: HashMap<i32, srp::Challenge>,
    /// Exported authorizations not imported yet: token → target data centre.
    exports: HashMap<Vec<u8>, i32>,
}

struct Code {
    phone: String,
    code: String,
    sent_at: i32,
    expired: bool,
}

impl Login {
    pub(crate) fn expire_all(&mut self) {
        for c in self.codes.values_mut() {
            c.expired = true;
        }
    }
}

fn authorization(server: &Server) -> tl::enums::auth::Authorization {
    tl::enums::auth::Authorization::Authorization(tl::types::auth::Authorization {
        setup_password_required: false,
        otherwise_relogin_days: None,
        tmp_sessions: None,
        future_auth_token: None,
        user: tlbuild::self_user(server.self_id, server.self_hash),
    })
}

fn sent_code_type(kind: SentCodeKind, len: i32) -> tl::enums::auth::SentCodeType {
    use tl::enums::auth::SentCodeType as T;
    use tl::types::auth as t;
    match kind {
        SentCodeKind::Sms => T::Sms(t::SentCodeTypeSms { length: len }),
        SentCodeKind::Call => T::Call(t::SentCodeTypeCall { length: len }),
        SentCodeKind::FlashCall => T::FlashCall(t::SentCodeTypeFlashCall {
            pattern: "+1*".into(),
        }),
        SentCodeKind::MissedCall => T::MissedCall(t::SentCodeTypeMissedCall {
            prefix: "+1555".into(),
            length: len,
        }),
        SentCodeKind::Email => T::EmailCode(t::SentCodeTypeEmailCode {
            apple_signin_allowed: false,
            google_signin_allowed: false,
            email_pattern: "l*****k@example.com".into(),
            length: len,
            reset_available_period: None,
            reset_pending_date: None,
        }),
        SentCodeKind::SetUpEmailRequired => {
            T::SetUpEmailRequired(t::SentCodeTypeSetUpEmailRequired {
                apple_signin_allowed: false,
                google_signin_allowed: false,
            })
        }
        SentCodeKind::FragmentSms => T::FragmentSms(t::SentCodeTypeFragmentSms {
            url: "https://fragment.com/".into(),
            length: len,
        }),
        SentCodeKind::FirebaseSms => T::FirebaseSms(t::SentCodeTypeFirebaseSms {
            nonce: Some(rnd_bytes(16)),
            play_integrity_project_id: None,
            play_integrity_nonce: None,
            receipt: None,
            push_timeout: None,
            length: len,
        }),
        SentCodeKind::SmsWord => T::SmsWord(t::SentCodeTypeSmsWord { beginning: None }),
        SentCodeKind::SmsPhrase => T::SmsPhrase(t::SentCodeTypeSmsPhrase { beginning: None }),
        SentCodeKind::App | SentCodeKind::Success | SentCodeKind::PaymentRequired => {
            T::App(t::SentCodeTypeApp { length: len })
        }
    }
}

impl Server {
    /// The key of data centre `dc` now speaks for the account.
    fn authorize(&self, dc: i32) {
        self.set_key_auth(dc, KeyAuth::Authorized);
        self.set_home_dc(dc);
    }

    pub(crate) fn send_code(&self, dc: i32, req: tl::functions::auth::SendCode) -> Outcome {
        let phone: String = req
            .phone_number
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let digits = phone.strip_prefix('+').unwrap_or(&phone);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return err(400, "PHONE_NUMBER_INVALID");
        }
        if let Some(home) = self.opts.phone_dc
            && home != dc
        {
            return err(303, format!("PHONE_MIGRATE_{home}"));
        }
        let hash = hex::encode(rnd_bytes(9));
        self.login.lock().unwrap().codes.insert(
            hash.clone(),
            Code {
                phone,
                code: super::LOGIN_CODE.into(),
                sent_at: self.now_unix(),
                expired: false,
            },
        );
        let len = super::LOGIN_CODE.len() as i32;
        let sent = match self.opts.sent_code {
            SentCodeKind::Success => {
                self.authorize(dc);
                tl::enums::auth::SentCode::Success(tl::types::auth::SentCodeSuccess {
                    authorization: authorization(self),
                })
            }
            SentCodeKind::PaymentRequired => tl::enums::auth::SentCode::PaymentRequired(
                tl::types::auth::SentCodePaymentRequired {
                    store_product: "org.telegram.loopback.login".into(),
                    phone_code_hash: hash,
                    support_email_address: "sms@telegram.org".into(),
                    support_email_subject: "login".into(),
                    premium_days: 7,
                    currency: "USD".into(),
                    amount: 99,
                },
            ),
            kind => tl::enums::auth::SentCode::Code(tl::types::auth::SentCode {
                r#type: sent_code_type(kind, len),
                phone_code_hash: hash,
                next_type: None,
                timeout: None,
            }),
        };
        Outcome::Reply(sent.to_bytes())
    }

    pub(crate) fn sign_in(&self, dc: i32, req: tl::functions::auth::SignIn) -> Outcome {
        if req.phone_code_hash.is_empty() {
            return err(400, "PHONE_CODE_HASH_EMPTY");
        }
        let given = req.phone_code.unwrap_or_default();
        if given.is_empty() {
            return err(400, "PHONE_CODE_EMPTY");
        }
        {
            let mut login = self.login.lock().unwrap();
            let now = self.now_unix();
            let ttl = self.opts.code_ttl.as_secs() as i32;
            let Some(code) = login.codes.get(&req.phone_code_hash) else {
                return err(400, "PHONE_CODE_EXPIRED");
            };
            let phone: String = req
                .phone_number
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            if phone != code.phone {
                return err(400, "PHONE_NUMBER_INVALID");
            }
            if code.expired || now - code.sent_at >= ttl {
                return err(400, "PHONE_CODE_EXPIRED");
            }
            if given != code.code {
                return err(400, "PHONE_CODE_INVALID");
            }
            login.codes.remove(&req.phone_code_hash);
        }
        if self.opts.password.is_some() {
            self.set_key_auth(dc, KeyAuth::PasswordNeeded);
            return err(401, "SESSION_PASSWORD_NEEDED");
        }
        self.authorize(dc);
        Outcome::Reply(authorization(self).to_bytes())
    }

    pub(crate) fn get_password(&self, dc: i32) -> Outcome {
        if !matches!(
            self.key_auth(dc),
            KeyAuth::Authorized | KeyAuth::PasswordNeeded
        ) {
            return err(401, "AUTH_KEY_UNREGISTERED");
        }
        let p = srp::p_bytes();
        let new_algo =
            tl::enums::PasswordKdfAlgo::Sha256Sha256Pbkdf2Hmacsha512iter100000Sha256ModPow(
                tl::types::PasswordKdfAlgoSha256Sha256Pbkdf2Hmacsha512iter100000Sha256ModPow {
                    salt1: rnd_bytes(8),
                    salt2: rnd_bytes(16),
                    g: srp::G,
                    p: p.clone(),
                },
            );
        let new_secure_algo = tl::enums::SecurePasswordKdfAlgo::Pbkdf2Hmacsha512iter100000(
            tl::types::SecurePasswordKdfAlgoPbkdf2Hmacsha512iter100000 { salt: rnd_bytes(8) },
        );
        let mut login = self.login.lock().unwrap();
        let (current_algo, srp_b, srp_id) = match &self.opts.password {
            None => (None, None, None),
            Some(password) => {
                let ver = login
                    .verifier
                    .get_or_insert_with(|| srp::Verifier::new(password));
                let algo = tl::enums::PasswordKdfAlgo::Sha256Sha256Pbkdf2Hmacsha512iter100000Sha256ModPow(
                    tl::types::PasswordKdfAlgoSha256Sha256Pbkdf2Hmacsha512iter100000Sha256ModPow {
                        salt1: ver.salt1.clone(),
                        salt2: ver.salt2.clone(),
                        g: srp::G,
                        p,
                    },
                );
                let ch = srp::Challenge::new(ver);
                let out = (Some(algo), Some(ch.g_b.to_vec()), Some(ch.id));
                login.challenges.insert(dc, ch);
                out
            }
        };
        let password = tl::enums::account::Password::Password(tl::types::account::Password {
            has_recovery: false,
            has_secure_values: false,
            has_password: current_algo.is_some(),
            current_algo,
            srp_b,
            srp_id,
            hint: self
                .opts
                .password
                .as_ref()
                .and(self.opts.password_hint.clone()),
            email_unconfirmed_pattern: None,
            new_algo,
            new_secure_algo,
            secure_random: rnd_bytes(256),
            pending_reset_date: None,
            login_email_pattern: None,
        });
        Outcome::Reply(password.to_bytes())
    }

    pub(crate) fn check_password(
        &self,
        dc: i32,
        req: tl::functions::auth::CheckPassword,
    ) -> Outcome {
        if !matches!(
            self.key_auth(dc),
            KeyAuth::Authorized | KeyAuth::PasswordNeeded
        ) {
            return err(401, "AUTH_KEY_UNREGISTERED");
        }
        let tl::enums::InputCheckPasswordSrp::Srp(given) = req.password else {
            return err(400, "PASSWORD_HASH_INVALID");
        };
        let ok = {
            let mut login = self.login.lock().unwrap();
            let Some(ch) = login.challenges.remove(&dc) else {
                return err(400, "SRP_ID_INVALID");
            };
            if ch.id != given.srp_id {
                return err(400, "SRP_ID_INVALID");
            }
            match &login.verifier {
                Some(ver) => ch.check(ver, &given.a, &given.m1),
                None => false,
            }
        };
        if !ok {
            return err(400, "PASSWORD_HASH_INVALID");
        }
        self.authorize(dc);
        Outcome::Reply(authorization(self).to_bytes())
    }

    pub(crate) fn export_authorization(
        &self,
        dc: i32,
        req: tl::functions::auth::ExportAuthorization,
    ) -> Outcome {
        if req.dc_id == dc || self.dc(req.dc_id).is_none() {
            return err(400, "DC_ID_INVALID");
        }
        let token = rnd_bytes(128);
        self.login
            .lock()
            .unwrap()
            .exports
            .insert(token.clone(), req.dc_id);
        Outcome::Reply(
            tl::enums::auth::ExportedAuthorization::Authorization(
                tl::types::auth::ExportedAuthorization {
                    id: self.self_id,
                    bytes: token,
                },
            )
            .to_bytes(),
        )
    }

    pub(crate) fn import_authorization(
        &self,
        dc: i32,
        req: tl::functions::auth::ImportAuthorization,
    ) -> Outcome {
        let target = self.login.lock().unwrap().exports.remove(&req.bytes);
        if req.id != self.self_id || target != Some(dc) {
            return err(400, "AUTH_BYTES_INVALID");
        }
        // Another data centre's key for the same account; the home stays where it was.
        self.set_key_auth(dc, KeyAuth::Authorized);
        Outcome::Reply(authorization(self).to_bytes())
    }
}
