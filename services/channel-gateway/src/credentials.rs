//! Provider credentials, sealed with ChaCha20-Poly1305 under a key from configuration. The account
//! and provider are bound in as associated data, so a sealed blob cannot be replayed under another
//! account. Nothing here is ever logged or returned.

use c2m_proto::v1::Provider;
use chacha20poly1305::{
    ChaCha20Poly1305, Key, Nonce,
    aead::{Aead, KeyInit, Payload},
};
use sqlx::PgPool;

const NONCE: usize = 12;

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
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(*****)")
    }
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(&Key::from(*key)),
        }
    }

    fn aad(account_id: &str, provider: Provider) -> Vec<u8> {
        format!("{account_id}\0{}", provider.as_str_name()).into_bytes()
    }

    pub fn seal(&self, account_id: &str, provider: Provider, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce).expect("the OS provides randomness");
        let aad = Self::aad(account_id, provider);
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("encryption of an in-memory buffer cannot fail");
        [nonce.as_slice(), &sealed].concat()
    }

    pub fn open(
        &self,
        account_id: &str,
        provider: Provider,
        sealed: &[u8],
    ) -> Result<Vec<u8>, CredentialsError> {
        if sealed.len() < NONCE {
            return Err(CredentialsError::Sealed);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE);
        let nonce: [u8; NONCE] = nonce.try_into().map_err(|_| CredentialsError::Sealed)?;
        let aad = Self::aad(account_id, provider);
        self.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| CredentialsError::Sealed)
    }
}

/// Stores sealed credentials for an account and provider, replacing what was there.
pub async fn put(
    pool: &PgPool,
    sealer: &Sealer,
    account_id: &str,
    provider: Provider,
    plaintext: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO provider_credentials (account_id, provider, ciphertext) VALUES ($1, $2, $3) \
         ON CONFLICT (account_id, provider) DO UPDATE SET ciphertext = $3, updated_at = now()",
    )
    .bind(account_id)
    .bind(provider.as_str_name())
    .bind(sealer.seal(account_id, provider, plaintext))
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn delete(
    pool: &PgPool,
    account_id: &str,
    provider: Provider,
) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("DELETE FROM provider_credentials WHERE account_id = $1 AND provider = $2")
            .bind(account_id)
            .bind(provider.as_str_name())
            .execute(pool)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// An account's opened credentials for `provider`, as stored (an encoded credentials message).
pub async fn open(
    pool: &PgPool,
    sealer: &Sealer,
    account_id: &str,
    provider: Provider,
) -> Result<Vec<u8>, CredentialsError> {
    let sealed: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT ciphertext FROM provider_credentials WHERE account_id = $1 AND provider = $2",
    )
    .bind(account_id)
    .bind(provider.as_str_name())
    .fetch_optional(pool)
    .await?;
    let sealed = sealed.ok_or(CredentialsError::Missing(provider.as_str_name()))?;
    sealer.open(account_id, provider, &sealed)
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
    }
}
