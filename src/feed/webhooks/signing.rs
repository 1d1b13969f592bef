//! The Standard Webhooks scheme (standardwebhooks.com): `webhook-id`, `webhook-timestamp` and
//! `webhook-signature` (`v1,` and base64 of HMAC-SHA256 over `id.timestamp.body`, keyed with
//! the secret's bytes — the base64 after `whsec_`), so receivers verify with the scheme's own
//! libraries.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const PREFIX: &str = "whsec_";

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("a webhook secret is `whsec_` and base64 of 24 to 64 bytes: {0}")]
pub struct BadSecret(&'static str);

/// A subscription's signing key.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn parse(secret: &str) -> Result<Self, BadSecret> {
        let encoded = secret
            .strip_prefix(PREFIX)
            .ok_or(BadSecret("the prefix is missing"))?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| BadSecret("not base64"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(BadSecret("wrong length"));
        }
        Ok(Secret(key))
    }

    /// Whether two secrets are the same key.
    pub fn same(&self, other: &Secret) -> bool {
        self.0 == other.0
    }

    /// A fresh random secret, as written.
    pub fn generate() -> String {
        let mut key = Vec::with_capacity(32);
        key.extend_from_slice(Uuid::new_v4().as_bytes());
        key.extend_from_slice(Uuid::new_v4().as_bytes());
        format!("{PREFIX}{}", STANDARD.encode(key))
    }

    /// The `webhook-signature` header's value for a message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            hmac::Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-id` of a change: derived from the run and the change's hash alone, so every
/// region sends the same change under the same id and a receiver subscribed in several
/// regions keeps one.
pub fn message_id(run: Uuid, change_hash: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"crdt-node:webhook:");
    h.update(run.as_bytes());
    h.update(change_hash);
    format!("msg_{}", hex::encode(&h.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_scheme_s_own_example() {
        // The example in the Standard Webhooks specification.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_are_checked_and_generated_well_formed() {
        assert!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Secret::parse("whsec_!!!").is_err());
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err(), "5 bytes");
        assert!(Secret::parse(&Secret::generate()).is_ok());
        assert_ne!(Secret::generate(), Secret::generate());
    }

    #[test]
    fn a_change_has_one_id_everywhere() {
        let run = Uuid::new_v4();
        assert_eq!(message_id(run, b"h"), message_id(run, b"h"));
        assert_ne!(message_id(run, b"h"), message_id(run, b"i"));
        assert_ne!(message_id(run, b"h"), message_id(Uuid::new_v4(), b"h"));
    }
}
