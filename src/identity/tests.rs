use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::*;
use crate::config::JwtSettings;

const SECRET: &str = "test-secret";
const RSA: &str = include_str!("../../tests/fixtures/jwt/rsa.pem");
const ED25519: &str = include_str!("../../tests/fixtures/jwt/ed25519.pem");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn auth() -> Auth {
    let settings = JwtSettings {
        hs256_secret: Some(SECRET.into()),
        jwks_file: Some(format!(
            "{}/tests/fixtures/jwt/jwks.json",
            env!("CARGO_MANIFEST_DIR")
        )),
        leeway_secs: 0,
        ..JwtSettings::default()
    };
    let users = Verifier::from_settings(&settings).unwrap();
    Auth::new(Some("service-token".into()), users)
}

fn hs256(claims: Value, secret: &str) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes());
    encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

fn signed(alg: Algorithm, kid: &str, claims: Value) -> String {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA.as_bytes()).unwrap(),
        _ => EncodingKey::from_ed_pem(ED25519.as_bytes()).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    encode(&header, &claims, &key).unwrap()
}

fn claims(runs: Value, role: &str) -> Value {
    json!({"sub": "ana", "runs": runs, "role": role, "exp": now() + 600})
}

#[test]
fn a_user_token_names_the_user_runs_and_role() {
    let run = Uuid::new_v4();
    let token = hs256(claims(json!([run.to_string()]), "write"), SECRET);
    let id = auth().identify(Some(&token)).unwrap();
    assert_eq!(id.user(Some("mallory".into())).as_deref(), Some("ana"));
    assert_eq!(id.allows(run, Access::Write), Ok(()));
    let other = Uuid::new_v4();
    assert_eq!(id.allows(other, Access::Read), Err(Denied::OtherRun(other)));
    assert!(!id.sees(other));
    assert!(id.expires_in().is_some_and(|d| d.as_secs() > 500));
}

#[test]
fn a_read_only_token_reads_but_never_writes() {
    let run = Uuid::new_v4();
    let id = auth()
        .identify(Some(&hs256(claims(json!("*"), "read"), SECRET)))
        .unwrap();
    assert_eq!(id.allows(run, Access::Read), Ok(()));
    assert_eq!(id.allows(run, Access::Write), Err(Denied::ReadOnly(run)));
}

#[test]
fn expired_forged_and_incomplete_tokens_are_refused_with_the_reason() {
    let a = auth();
    let mut expired = claims(json!("*"), "write");
    expired["exp"] = json!(now() - 60);
    let refused = |t: &str| match a.identify(Some(t)) {
        Err(AuthError::Token(e)) => e,
        other => panic!("not refused as a token: {other:?}"),
    };
    assert_eq!(refused(&hs256(expired, SECRET)), TokenError::Expired);
    let forged = hs256(claims(json!("*"), "write"), "another-secret");
    assert_eq!(refused(&forged), TokenError::BadSignature);
    let no_role = json!({"sub": "ana", "runs": "*", "exp": now() + 60});
    assert!(matches!(
        refused(&hs256(no_role, SECRET)),
        TokenError::Claims(_)
    ));
    let bad_role = claims(json!("*"), "admin");
    assert!(matches!(
        refused(&hs256(bad_role, SECRET)),
        TokenError::Claims(_)
    ));
    let no_exp = json!({"sub": "ana", "runs": "*", "role": "read"});
    assert!(matches!(
        refused(&hs256(no_exp, SECRET)),
        TokenError::Claims(_)
    ));
    let bad_runs = claims(json!(["not-a-uuid"]), "read");
    assert!(matches!(
        refused(&hs256(bad_runs, SECRET)),
        TokenError::Claims(_)
    ));
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let settings = JwtSettings {
        hs256_secret: Some(SECRET.into()),
        issuer: Some("https://idp.example".into()),
        audience: Some("crdt-node".into()),
        ..JwtSettings::default()
    };
    let a = Auth::new(None, Verifier::from_settings(&settings).unwrap());
    let mut c = claims(json!("*"), "read");
    c["iss"] = json!("https://idp.example");
    c["aud"] = json!("crdt-node");
    assert!(a.identify(Some(&hs256(c.clone(), SECRET))).is_ok());
    for (field, value) in [("iss", "https://elsewhere"), ("aud", "another-service")] {
        let mut wrong = c.clone();
        wrong[field] = json!(value);
        let refused = a.identify(Some(&hs256(wrong, SECRET)));
        assert!(
            matches!(refused, Err(AuthError::Token(TokenError::Claims(_)))),
            "{field}"
        );
    }
    let mut missing = c.clone();
    missing.as_object_mut().unwrap().remove("aud");
    assert!(
        a.identify(Some(&hs256(missing, SECRET))).is_err(),
        "aud required"
    );
}

#[test]
fn jwks_keys_verify_rs256_and_eddsa_tokens() {
    let a = auth();
    for (alg, kid) in [(Algorithm::RS256, "rsa-1"), (Algorithm::EdDSA, "ed-1")] {
        let token = signed(alg, kid, claims(json!("*"), "write"));
        let id = a.identify(Some(&token)).unwrap();
        assert_eq!(id.user(None).as_deref(), Some("ana"), "{alg:?}");
        let unknown = signed(alg, "rotated-away", claims(json!("*"), "write"));
        assert!(matches!(
            a.identify(Some(&unknown)),
            Err(AuthError::Token(TokenError::UnknownKey { .. }))
        ));
    }
}

#[test]
fn the_api_token_is_a_service_and_anything_else_is_refused() {
    let a = auth();
    assert_eq!(a.identify(Some("service-token")), Ok(Identity::Service));
    assert_eq!(
        Identity::Service.user(Some("bot".into())).as_deref(),
        Some("bot")
    );
    assert_eq!(a.identify(None), Err(AuthError::Missing));
    assert_eq!(a.identify(Some("  ")), Err(AuthError::Missing));
    assert_eq!(a.identify(Some("guess")), Err(AuthError::Wrong));
    let open = Auth::new(None, None);
    assert_eq!(open.identify(None), Ok(Identity::Service));
}

/// The claim rules of issue 19, each refused with its reason.
#[test]
fn claims_that_would_widen_a_token_are_refused() {
    let a = auth();
    let run = Uuid::new_v4().to_string();
    let reason = |claims: Value| match a.identify(Some(&hs256(claims, SECRET))) {
        Err(e) => e.to_string(),
        Ok(id) => panic!("taken: {id:?}"),
    };
    let with = |key: &str, value: Value| {
        let mut c = claims(json!([run]), "write");
        c[key] = value;
        c
    };
    // Not valid yet: refused until `nbf` (no leeway in these tests).
    let r = reason(with("nbf", json!(now() + 3600)));
    assert!(r.contains("not yet valid") || r.contains("Immature"), "{r}");
    assert!(a
        .identify(Some(&hs256(with("nbf", json!(now() - 10)), SECRET)))
        .is_ok());
    // Issued in the future.
    let r = reason(with("iat", json!(now() + 3600)));
    assert!(r.contains("iat is in the future"), "{r}");
    // Valid for too long, up to never expiring.
    let r = reason(with("exp", json!(now() + 30 * 24 * 3600)));
    assert!(r.contains("exp is more than"), "{r}");
    let r = reason(with("exp", json!(u64::MAX)));
    assert!(r.contains("exp"), "{r}");
    // "*" only alone; every other entry a run id.
    let r = reason(claims(json!(["*", "junk"]), "write"));
    assert!(r.contains("must stand alone"), "{r}");
    let r = reason(claims(json!([run, "junk"]), "write"));
    assert!(r.contains("\"junk\" is not a run id"), "{r}");
    assert!(a
        .identify(Some(&hs256(claims(json!(["*"]), "read"), SECRET)))
        .is_ok());
}

#[test]
fn a_header_with_critical_extensions_is_refused() {
    use base64::Engine;
    use hmac::{Hmac, KeyInit, Mac};
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let sign = |header: Value| {
        let body = b64(&claims(json!("*"), "write"));
        let input = format!("{}.{body}", b64(&header));
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(input.as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{input}.{sig}")
    };
    let plain = sign(json!({"alg": "HS256", "typ": "JWT"}));
    assert!(
        auth().identify(Some(&plain)).is_ok(),
        "the same token without crit"
    );
    let critical = sign(json!({"alg": "HS256", "typ": "JWT", "crit": ["exp"]}));
    let err = auth().identify(Some(&critical)).unwrap_err().to_string();
    assert!(err.contains("critical extensions"), "{err}");
}
