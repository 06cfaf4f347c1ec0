//! Provider credentials, sealed with ChaCha20-Poly1305 under a key from configuration. The account
//! and provider are bound in as associated data, so a sealed blob cannot be replayed under another
//! account. Nothing here is ever logged or returned.

use c2m_proto::v1::{self as pb, Provider, put_provider_credentials_request::Credentials};

use crate::store::GatewayStore;
use c2m_runtime::{is_e164, status::FieldViolations};
use prost::Message;

use crate::{google::ServiceAccount, jwt::Es256};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("no {0} credentials stored for this account")]
    Missing(&'static str),
    #[error(
        "stored credentials cannot be opened with the configured key (was channel_gateway.credentials_key changed?)"
    )]
    Sealed,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Seals and opens credentials.
#[derive(Clone)]
pub struct Sealer {
    key: std::sync::Arc<LessSafeKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(*****)")
    }
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            key: std::sync::Arc::new(LessSafeKey::new(
                UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key"),
            )),
        }
    }

    fn aad(account_id: &str, provider: Provider) -> Vec<u8> {
        format!("{account_id}\0{}", provider.as_str_name()).into_bytes()
    }

    /// The nonce (random, 12 bytes), then the ciphertext and its tag.
    pub fn seal(&self, account_id: &str, provider: Provider, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS provides randomness");
        let mut sealed = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(account_id, provider)),
                &mut sealed,
            )
            .expect("sealing an in-memory buffer cannot fail");
        [nonce.as_slice(), &sealed].concat()
    }

    pub fn open(
        &self,
        account_id: &str,
        provider: Provider,
        sealed: &[u8],
    ) -> Result<Vec<u8>, CredentialsError> {
        let (nonce, ciphertext) = sealed
            .split_first_chunk::<{ NONCE_LEN }>()
            .ok_or(CredentialsError::Sealed)?;
        let mut buffer = ciphertext.to_vec();
        let plaintext_len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(Self::aad(account_id, provider)),
                &mut buffer,
            )
            .map_err(|_| CredentialsError::Sealed)?
            .len();
        buffer.truncate(plaintext_len);
        Ok(buffer)
    }
}

/// An account's opened credentials for `provider`, as stored (an encoded credentials message).
pub async fn open(
    store: &dyn GatewayStore,
    sealer: &Sealer,
    account_id: &str,
    provider: Provider,
) -> Result<Vec<u8>, CredentialsError> {
    let sealed = store
        .credentials(account_id, provider)
        .await?
        .ok_or(CredentialsError::Missing(provider.as_str_name()))?;
    sealer.open(account_id, provider, &sealed)
}

fn validate_twilio(t: &pb::TwilioCredentials, v: &mut FieldViolations) {
    if !(t.account_sid.starts_with("AC") && t.account_sid.len() == 34) {
        v.add(
            "twilio.account_sid",
            "an Account SID: AC and 32 hex characters",
        );
    }
    if t.auth_token.is_empty() {
        v.add("twilio.auth_token", "required");
    }
    match (t.from_number.is_empty(), t.messaging_service_sid.is_empty()) {
        (true, true) => v.add(
            "twilio.from_number",
            "one of from_number or messaging_service_sid is required",
        ),
        (false, false) => v.add(
            "twilio.messaging_service_sid",
            "give from_number or messaging_service_sid, not both",
        ),
        (false, true) if !is_e164(&t.from_number) => {
            v.add("twilio.from_number", "an E.164 number, e.g. +14155550100")
        }
        (true, false) if !t.messaging_service_sid.starts_with("MG") => v.add(
            "twilio.messaging_service_sid",
            "a Messaging Service SID starts with MG",
        ),
        _ => {}
    }
}

/// The credentials' provider and encoding, with what is wrong with them added to `violations`.
pub fn validated(
    credentials: Option<&Credentials>,
    violations: &mut FieldViolations,
) -> (Provider, Vec<u8>) {
    match credentials {
        Some(Credentials::Twilio(t)) => {
            validate_twilio(t, violations);
            (Provider::Twilio, t.encode_to_vec())
        }
        Some(Credentials::MetaWhatsapp(m)) => {
            if m.phone_number_id.is_empty()
                || !m.phone_number_id.bytes().all(|b| b.is_ascii_digit())
            {
                violations.add(
                    "meta_whatsapp.phone_number_id",
                    "the numeric phone number id",
                );
            }
            for (field, value) in [
                ("meta_whatsapp.access_token", &m.access_token),
                ("meta_whatsapp.app_secret", &m.app_secret),
                ("meta_whatsapp.verify_token", &m.verify_token),
            ] {
                if value.is_empty() {
                    violations.add(field, "required");
                }
            }
            (Provider::MetaWhatsapp, m.encode_to_vec())
        }
        Some(Credentials::Sandbox(sandbox)) => (Provider::Sandbox, sandbox.encode_to_vec()),
        Some(Credentials::GoogleRbm(g)) => {
            if g.agent_id.is_empty() {
                violations.add("google_rbm.agent_id", "required");
            }
            if let Err(why) = ServiceAccount::parse(&g.service_account_json) {
                violations.add("google_rbm.service_account_json", why);
            }
            if g.client_token.is_empty() {
                violations.add(
                    "google_rbm.client_token",
                    "required: it verifies RBM's webhooks",
                );
            }
            (Provider::GoogleRbm, g.encode_to_vec())
        }
        Some(Credentials::Fcm(f)) => {
            if f.project_id.is_empty() {
                violations.add("fcm.project_id", "required");
            }
            if let Err(why) = ServiceAccount::parse(&f.service_account_json) {
                violations.add("fcm.service_account_json", why);
            }
            (Provider::Fcm, f.encode_to_vec())
        }
        Some(Credentials::Apns(a)) => {
            if a.team_id.len() != 10 {
                violations.add("apns.team_id", "the 10-character Team ID");
            }
            if a.key_id.len() != 10 {
                violations.add("apns.key_id", "the 10-character Key ID");
            }
            if let Err(why) = Es256::from_pem(&a.private_key_pem) {
                violations.add("apns.private_key_pem", format!("the .p8 key: {why}"));
            }
            if a.topic.is_empty() {
                violations.add("apns.topic", "required: the app's bundle id");
            }
            (Provider::Apns, a.encode_to_vec())
        }
        None => {
            violations.add("credentials", "required");
            (Provider::Unspecified, Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_credentials_open_only_for_their_account_and_key() {
        let sealer = Sealer::new(&[7; 32]);
        let sealed = sealer.seal("acme", Provider::Twilio, b"token");
        assert!(
            !sealed.windows(5).any(|w| w == b"token"),
            "plaintext leaked"
        );
        assert_eq!(
            sealer.open("acme", Provider::Twilio, &sealed).unwrap(),
            b"token"
        );
        assert!(sealer.open("globex", Provider::Twilio, &sealed).is_err());
        assert!(
            sealer
                .open("acme", Provider::MetaWhatsapp, &sealed)
                .is_err()
        );
        assert!(
            Sealer::new(&[8; 32])
                .open("acme", Provider::Twilio, &sealed)
                .is_err()
        );
        assert!(
            sealer
                .open("acme", Provider::Twilio, &sealed[..11])
                .is_err()
        );
    }

    /// Sealed by another ChaCha20-Poly1305 (Python's `cryptography`, as the RustCrypto crate
    /// sealed them before c2m moved to ring): credentials stored then still open.
    #[test]
    fn credentials_sealed_by_another_implementation_open() {
        let sealed = hex::decode(
            "6465666768696a6b6c6d6e6f4f33dabfeccd292694b57011d0b3fae752bbdc4f569b0d96113aed2e02fe8fc0437e",
        )
        .expect("hex");
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            Sealer::new(&key)
                .open("acme", Provider::Twilio, &sealed)
                .expect("opens"),
            br#"{"auth_token":"t"}"#
        );
    }
}
