//! User tokens as an identity provider would issue them (HS256), for tests that ask the node
//! for signed identities.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// A token for `sub` on `runs` (a JSON list of run ids, or `"*"`) with `role`, signed with
/// `secret`, expiring `exp_in` seconds from now (negative: already expired).
pub fn user_token(secret: &str, sub: &str, runs: Value, role: &str, exp_in: i64) -> String {
    let exp = now_secs().saturating_add_signed(exp_in);
    let claims = json!({"sub": sub, "runs": runs, "role": role, "exp": exp});
    let key = EncodingKey::from_secret(secret.as_bytes());
    encode(&Header::new(Algorithm::HS256), &claims, &key).expect("signed")
}

/// Seconds since the epoch.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
