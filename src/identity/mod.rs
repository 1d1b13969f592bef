//! Who is asking, and what they may do with which run.
//!
//! Two kinds of credential reach every door (HTTP API, browser sessions, automerge-repo): the
//! static API token, a service credential with access to every run (the user it records is
//! whatever the request names), and signed user tokens (JWT: HS256 with a shared secret, or
//! RS256 / EdDSA / ES256 with keys from a JWKS file or URL) whose claims name the user (`sub`),
//! the runs (`runs`: ids, or `"*"`), the role (`read` or `write`) and the expiry (`exp`).
//! A user's events, grafts and prunes record the token's `sub`, never what a body says.

pub mod verifier;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use subtle::ConstantTimeEq;
use uuid::Uuid;

pub use verifier::{TokenError, Verifier};

/// What a user token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Read,
    Write,
}

/// The runs a user token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunSet {
    All,
    Only(Vec<Uuid>),
}

impl RunSet {
    pub fn contains(&self, run: Uuid) -> bool {
        match self {
            RunSet::All => true,
            RunSet::Only(runs) => runs.contains(&run),
        }
    }
}

/// A verified user token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub sub: String,
    pub runs: RunSet,
    pub role: Role,
    /// `exp`, seconds since the epoch.
    pub expires: u64,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The static API token, or a node that asks for no credentials: every run, any user.
    Service,
    /// A user token's holder.
    User(Grant),
}

/// What a request wants to do with a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Why an identity may not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this token grants no access to run {0}")]
    OtherRun(Uuid),
    #[error("this token is read-only (role \"read\"): changes to run {0} are refused")]
    ReadOnly(Uuid),
}

impl Identity {
    /// Whether the identity may `access` the run.
    pub fn allows(&self, run: Uuid, access: Access) -> Result<(), Denied> {
        let Identity::User(grant) = self else {
            return Ok(());
        };
        if !grant.runs.contains(run) {
            return Err(Denied::OtherRun(run));
        }
        if access == Access::Write && grant.role == Role::Read {
            return Err(Denied::ReadOnly(run));
        }
        Ok(())
    }

    /// The user to record: a user token's `sub`; for a service, what the request names.
    pub fn user(&self, named: Option<String>) -> Option<String> {
        match self {
            Identity::Service => named,
            Identity::User(grant) => Some(grant.sub.clone()),
        }
    }

    /// The user whose own changes these are, held to the run's authorship rules (a user
    /// token's `sub`); None for a service, which writes on others' behalf and may name them.
    pub fn author(&self) -> Option<String> {
        match self {
            Identity::Service => None,
            Identity::User(grant) => Some(grant.sub.clone()),
        }
    }

    /// How long until the identity's token expires (none for a service).
    pub fn expires_in(&self) -> Option<Duration> {
        let Identity::User(grant) = self else {
            return None;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Some(Duration::from_secs(grant.expires.saturating_sub(now)))
    }

    /// Whether the runs list shows the run.
    pub fn sees(&self, run: Uuid) -> bool {
        self.allows(run, Access::Read).is_ok()
    }
}

/// Why a credential was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required: the API token or a signed user token")]
    Missing,
    #[error("the token is neither the API token nor a user token this node accepts")]
    Wrong,
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// The credentials a node takes.
pub struct Auth {
    api_token: Option<String>,
    users: Option<Verifier>,
}

impl Auth {
    pub fn new(api_token: Option<String>, users: Option<Verifier>) -> Self {
        Auth { api_token, users }
    }

    /// Whether the node asks for no credentials at all.
    pub fn is_open(&self) -> bool {
        self.api_token.is_none() && self.users.is_none()
    }

    /// Who presents `token` (none presented: `None`).
    pub fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        if self.is_open() {
            return Ok(Identity::Service);
        }
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        let token = token.ok_or(AuthError::Missing)?;
        if let Some(expected) = &self.api_token {
            if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) {
                return Ok(Identity::Service);
            }
        }
        match &self.users {
            // A JWT is three base64url parts; anything else is a wrong API token.
            Some(users) if token.split('.').count() == 3 => {
                Ok(Identity::User(users.verify(token)?))
            }
            _ => Err(AuthError::Wrong),
        }
    }
}

#[cfg(test)]
mod tests;
