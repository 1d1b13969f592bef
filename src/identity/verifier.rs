//! Verifying user tokens (JWT) with `jsonwebtoken`: the keys (an HS256 secret, a JWKS file, a
//! JWKS URL refreshed in the background) and the claims this node requires.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use uuid::Uuid;

use super::{Grant, Role, RunSet};
use crate::config::JwtSettings;

/// Why a user token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("no key of this node verifies {alg:?} tokens{}", kid.as_deref().map(|k| format!(" with kid {k:?}")).unwrap_or_default())]
    UnknownKey { alg: Algorithm, kid: Option<String> },
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's claims are not usable: {0}")]
    Claims(String),
}

impl From<jsonwebtoken::errors::Error> for TokenError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => TokenError::Expired,
            K::InvalidSignature => TokenError::BadSignature,
            K::MissingRequiredClaim(c) => TokenError::Claims(format!("{c} is required")),
            K::Json(j) => TokenError::Claims(j.to_string()),
            K::InvalidIssuer => TokenError::Claims("iss is not the issuer this node trusts".into()),
            K::InvalidAudience => TokenError::Claims("aud does not name this node".into()),
            _ => TokenError::Malformed(e.to_string()),
        }
    }
}

/// Why the configured keys could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("JWKS file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("JWKS: {0}")]
    Set(String),
}

/// A public key from a JWKS.
struct JwkKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

#[derive(Default)]
struct Keys {
    hs256: Option<DecodingKey>,
    file: Vec<JwkKey>,
    url: Vec<JwkKey>,
}

/// Verifies user tokens; cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    keys: Arc<RwLock<Keys>>,
    leeway: u64,
    max_lifetime: u64,
    issuer: Option<String>,
    audience: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    runs: Option<RunsClaim>,
    role: Option<String>,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RunsClaim {
    One(String),
    Many(Vec<String>),
}

impl Verifier {
    /// The verifier the settings ask for; `None` when no key is configured.
    pub fn from_settings(s: &JwtSettings) -> Result<Option<Verifier>, KeyError> {
        if s.hs256_secret.is_none() && s.jwks_file.is_none() && s.jwks_url.is_none() {
            return Ok(None);
        }
        let mut keys = Keys {
            hs256: s
                .hs256_secret
                .as_deref()
                .map(|k| DecodingKey::from_secret(k.as_bytes())),
            ..Keys::default()
        };
        if let Some(path) = &s.jwks_file {
            let file = |reason: String| KeyError::File {
                path: path.clone(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
            keys.file = jwks(&text).map_err(|e| file(e.to_string()))?;
        }
        Ok(Some(Verifier {
            keys: Arc::new(RwLock::new(keys)),
            leeway: s.leeway_secs,
            max_lifetime: s.max_lifetime_secs,
            issuer: s.issuer.clone(),
            audience: s.audience.clone(),
        }))
    }

    /// Replaces the keys fetched from the JWKS URL.
    pub fn set_url_keys(&self, text: &str) -> Result<usize, KeyError> {
        let keys = jwks(text)?;
        let n = keys.len();
        self.keys.write().unwrap_or_else(|p| p.into_inner()).url = keys;
        Ok(n)
    }

    /// The token's grant, if a configured key signed it and its claims are whole and current.
    pub fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        let header = decode_header(token)?;
        refuse_critical(token)?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let candidates: Vec<&DecodingKey> = if header.alg == Algorithm::HS256 {
            keys.hs256.iter().collect()
        } else {
            keys.file
                .iter()
                .chain(&keys.url)
                .filter(|k| k.alg == header.alg)
                .filter(|k| header.kid.is_none() || k.kid == header.kid)
                .map(|k| &k.key)
                .collect()
        };
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey {
                alg: header.alg,
                kid: header.kid,
            });
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            // Without a configured audience, a token's `aud` is not checked.
            None => validation.validate_aud = false,
        }
        let mut last = TokenError::BadSignature;
        for key in candidates {
            match decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    self.check_times(&data.claims)?;
                    return grant(data.claims);
                }
                // Another key of the same algorithm may be the one (rotation without kids).
                Err(e) => last = e.into(),
            }
            if last != TokenError::BadSignature {
                break;
            }
        }
        Err(last)
    }

    /// `iat` not in the future and `exp` not too far ahead (each beyond the leeway); `exp` in
    /// the past and `nbf` ahead are checked by `jsonwebtoken`.
    fn check_times(&self, c: &Claims) -> Result<(), TokenError> {
        let now = jsonwebtoken::get_current_timestamp();
        if c.iat
            .is_some_and(|iat| iat > now.saturating_add(self.leeway))
        {
            return Err(TokenError::Claims("iat is in the future".into()));
        }
        let latest = now
            .saturating_add(self.max_lifetime)
            .saturating_add(self.leeway);
        if c.exp > latest {
            return Err(TokenError::Claims(format!(
                "exp is more than {} seconds away (the longest a token may live here)",
                self.max_lifetime
            )));
        }
        Ok(())
    }

    /// Fetches the JWKS URL now and every `every`, keeping the last keys that loaded.
    pub fn refresh_from(&self, url: String, every: Duration) {
        let verifier = self.clone();
        actix::spawn(async move {
            loop {
                match fetch(&url)
                    .await
                    .and_then(|text| verifier.set_url_keys(&text))
                {
                    Ok(n) => log::info!("identity: {n} keys from {url}"),
                    Err(e) => log::warn!("identity: keeping the previous keys: {e}"),
                }
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// The largest JWKS this node reads.
const MAX_JWKS_BYTES: usize = 1 << 20;

async fn fetch(url: &str) -> Result<String, KeyError> {
    let failed = |e: String| KeyError::Set(format!("{url}: {e}"));
    let mut response = awc::Client::default()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("HTTP {}", response.status())));
    }
    let body = response
        .body()
        .limit(MAX_JWKS_BYTES)
        .await
        .map_err(|e| failed(e.to_string()))?;
    String::from_utf8(body.to_vec()).map_err(|e| failed(e.to_string()))
}

/// The usable signature keys of a JWKS.
fn jwks(text: &str) -> Result<Vec<JwkKey>, KeyError> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| KeyError::Set(e.to_string()))?;
    let keys: Vec<JwkKey> = set.keys.iter().filter_map(jwk_key).collect();
    if keys.is_empty() {
        return Err(KeyError::Set("no usable signature key".into()));
    }
    Ok(keys)
}

fn jwk_key(jwk: &Jwk) -> Option<JwkKey> {
    let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
        (Some(KeyAlgorithm::RS256), _) => Algorithm::RS256,
        (Some(KeyAlgorithm::RS384), _) => Algorithm::RS384,
        (Some(KeyAlgorithm::RS512), _) => Algorithm::RS512,
        (Some(KeyAlgorithm::EdDSA), _) => Algorithm::EdDSA,
        (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
        (Some(KeyAlgorithm::ES384), _) => Algorithm::ES384,
        (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
        (None, AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
        (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        // Symmetric keys and other algorithms are not taken from a JWKS.
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(JwkKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

/// Refuses a token whose header names critical extensions (`crit`, RFC 7515 §4.1.11): this
/// node understands none, and a token that says it must be understood must not be taken as
/// if it were. (`jsonwebtoken`'s header type does not carry `crit`, so the header is read here.)
fn refuse_critical(token: &str) -> Result<(), TokenError> {
    use base64::Engine;
    let head = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
    let header: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
    match header.get("crit") {
        None => Ok(()),
        Some(crit) => Err(TokenError::Malformed(format!(
            "the header names critical extensions this node does not understand: {crit}"
        ))),
    }
}

/// The grant the claims describe.
fn grant(c: Claims) -> Result<Grant, TokenError> {
    let sub =
        run_doc::rules::name("sub", Some(&c.sub)).map_err(|e| TokenError::Claims(e.to_string()))?;
    let runs = match c.runs {
        Some(RunsClaim::One(s)) if s == "*" => RunSet::All,
        Some(RunsClaim::Many(ids)) if ids == ["*"] => RunSet::All,
        Some(RunsClaim::Many(ids)) if ids.iter().any(|s| s == "*") => {
            return Err(TokenError::Claims(
                "runs: \"*\" grants every run and must stand alone".into(),
            ))
        }
        Some(RunsClaim::Many(ids)) => RunSet::Only(
            ids.iter()
                .map(|s| {
                    Uuid::parse_str(s).map_err(|e| {
                        TokenError::Claims(format!("runs: {s:?} is not a run id: {e}"))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(RunsClaim::One(other)) => {
            return Err(TokenError::Claims(format!(
                "runs must be a list of run ids or \"*\", not {other:?}"
            )))
        }
        None => return Err(TokenError::Claims("runs is required".into())),
    };
    let role = match c.role.as_deref() {
        Some("read") => Role::Read,
        Some("write") => Role::Write,
        Some(other) => {
            return Err(TokenError::Claims(format!(
                "role must be \"read\" or \"write\", not {other:?}"
            )))
        }
        None => return Err(TokenError::Claims("role is required".into())),
    };
    Ok(Grant {
        sub,
        runs,
        role,
        expires: c.exp,
    })
}
