//! The signed tokens providers take instead of passwords: RS256 assertions for Google's OAuth 2.0
//! token endpoint (service accounts, for RCS and FCM) and ES256 provider tokens for APNs. Keys
//! arrive as PKCS#8 PEM, as Google's service-account JSON and Apple's `.p8` files carry them.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyError {
    #[error("not a PEM private key (-----BEGIN PRIVATE KEY-----)")]
    Pem,
    #[error("not a PKCS#8 {0} private key")]
    Key(&'static str),
}

/// A signing key read from PEM, refused at once (not at its first use) when it cannot sign.
fn key(
    pem: &str,
    algorithm: Algorithm,
    kind: &'static str,
    read: fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>,
) -> Result<EncodingKey, KeyError> {
    if !pem.contains("-----BEGIN PRIVATE KEY-----") {
        return Err(KeyError::Pem);
    }
    let key = read(pem.as_bytes()).map_err(|_| KeyError::Key(kind))?;
    jsonwebtoken::encode(&Header::new(algorithm), &serde_json::json!({}), &key)
        .map_err(|_| KeyError::Key(kind))?;
    Ok(key)
}

/// `header`'s `kid` and `typ` on a header for `algorithm`.
fn header(algorithm: Algorithm, header: &Value) -> Header {
    Header {
        kid: header["kid"].as_str().map(str::to_owned),
        typ: header["typ"].as_str().map(str::to_owned),
        ..Header::new(algorithm)
    }
}

/// An RSA key signing RS256 (RSASSA-PKCS1-v1_5 with SHA-256).
pub struct Rs256(EncodingKey);

impl std::fmt::Debug for Rs256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rs256(*****)")
    }
}

impl Rs256 {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        key(pem, Algorithm::RS256, "RSA", EncodingKey::from_rsa_pem).map(Self)
    }

    /// A compact JWS of `claims` under `header` (its `kid` and `typ`).
    pub fn sign(&self, header_fields: &Value, claims: &Value) -> String {
        jsonwebtoken::encode(&header(Algorithm::RS256, header_fields), claims, &self.0)
            .expect("the key signed when it was read")
    }
}

/// A P-256 key signing ES256.
pub struct Es256(EncodingKey);

impl std::fmt::Debug for Es256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Es256(*****)")
    }
}

impl Es256 {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        key(pem, Algorithm::ES256, "P-256", EncodingKey::from_ec_pem).map(Self)
    }

    /// A compact JWS of `claims` under `header` (its `kid` and `typ`).
    pub fn sign(&self, header_fields: &Value, claims: &Value) -> String {
        jsonwebtoken::encode(&header(Algorithm::ES256, header_fields), claims, &self.0)
            .expect("the key signed when it was read")
    }
}

#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use ring::{
        rand::SystemRandom,
        signature::{
            ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
            UnparsedPublicKey,
        },
    };

    use super::*;

    fn pem(der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("base64 is ascii"))
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn es256_tokens_verify_with_the_public_key() {
        let rng = SystemRandom::new();
        let der =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("a key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_ref(), &rng)
            .expect("parses");
        let key = Es256::from_pem(&pem(der.as_ref())).expect("parses from PEM");
        let token = key.sign(
            &serde_json::json!({"alg": "ES256", "kid": "K"}),
            &serde_json::json!({"iss": "T", "iat": 1}),
        );
        let (input, signature) = token.rsplit_once('.').expect("three parts");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref())
            .verify(
                input.as_bytes(),
                &URL_SAFE_NO_PAD.decode(signature).expect("base64url"),
            )
            .expect("the signature verifies");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(input.split('.').next().expect("header"))
                .expect("base64url"),
            br#"{"alg":"ES256","kid":"K"}"#
        );
    }

    #[test]
    fn keys_that_are_not_pem_or_not_the_right_kind_are_refused() {
        assert_eq!(Es256::from_pem("hello").unwrap_err(), KeyError::Pem);
        assert_eq!(
            Rs256::from_pem(&pem(b"not a key")).unwrap_err(),
            KeyError::Key("RSA")
        );
        let der =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .expect("a key");
        assert_eq!(
            Rs256::from_pem(&pem(der.as_ref())).unwrap_err(),
            KeyError::Key("RSA")
        );
    }
}
