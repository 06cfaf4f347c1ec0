//! The signed tokens providers take instead of passwords: RS256 assertions for Google's OAuth 2.0
//! token endpoint (service accounts, for RCS and FCM) and ES256 provider tokens for APNs. Keys
//! arrive as PKCS#8 PEM, as Google's service-account JSON and Apple's `.p8` files carry them.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, RSA_PKCS1_SHA256, RsaKeyPair},
};
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyError {
    #[error("not a PEM private key (-----BEGIN PRIVATE KEY-----)")]
    Pem,
    #[error("not a PKCS#8 {0} private key")]
    Key(&'static str),
}

/// The DER inside a `-----BEGIN PRIVATE KEY-----` block.
pub fn pkcs8_from_pem(pem: &str) -> Result<Vec<u8>, KeyError> {
    let body = pem
        .split("-----BEGIN PRIVATE KEY-----")
        .nth(1)
        .and_then(|rest| rest.split("-----END PRIVATE KEY-----").next())
        .ok_or(KeyError::Pem)?;
    let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|_| KeyError::Pem)
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// An RSA key that signs RS256 tokens.
#[derive(Debug)]
pub struct Rs256(RsaKeyPair);

impl Rs256 {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        RsaKeyPair::from_pkcs8(&pkcs8_from_pem(pem)?)
            .map(Self)
            .map_err(|_| KeyError::Key("RSA"))
    }

    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let mut signature = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .expect("an RSA signature into a modulus-sized buffer");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// A P-256 key that signs ES256 tokens (the signature as r‖s, as JOSE wants it).
#[derive(Debug)]
pub struct Es256(EcdsaKeyPair);

impl Es256 {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8_from_pem(pem)?,
            &SystemRandom::new(),
        )
        .map(Self)
        .map_err(|_| KeyError::Key("P-256"))
    }

    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let signature = self
            .0
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("ECDSA signing with the system's randomness");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, KeyPair, UnparsedPublicKey};

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
