//! Configuration: `config/application.yml` (or the file `CRDT_CONFIG` names), overridden by
//! environment variables. Every value is checked before the node starts, and a bad one stops
//! start-up with a message naming its key.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    pub crdt: Crdt,
    pub server: Server,
    pub database: Database,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Crdt {
    pub region: String,
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub mesh: Mesh,
    #[serde(default)]
    pub api: Api,
    #[serde(default)]
    pub browser: Browser,
    #[serde(default)]
    pub automerge: AutomergeRepo,
    #[serde(default)]
    pub snapshot: SnapshotSettings,
    #[serde(default)]
    pub runs: RunSettings,
    #[serde(default)]
    pub admission: Admission,
    #[serde(default)]
    pub memory: Memory,
    #[serde(default)]
    pub feed: Feed,
    #[serde(default)]
    pub cluster: Cluster,
}

/// Several pods of one region sharing one PostgreSQL database, one owner per run
/// (`runs::ownership`). Off by default: each node then has a database of its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Cluster {
    #[serde(default)]
    pub enabled: bool,
    /// Where the other pods reach this one (`http://POD_IP:PORT`); by default
    /// `http://<node id>:<port>`, which a StatefulSet's headless service resolves.
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// How long a pod's lease lasts unrenewed: a pod that dies has its runs taken over within
    /// this time (renewed every third of it).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// The region's pods prove their calls to each other with it (HMAC); required.
    #[serde(default)]
    pub secret: Option<String>,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            enabled: false,
            advertise_url: None,
            lease_ms: default_lease_ms(),
            secret: None,
        }
    }
}

fn default_lease_ms() -> u64 {
    5_000
}

/// The change feed: event streams and webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Feed {
    /// A comment goes down every idle stream this often, so proxies keep it open.
    #[serde(default = "default_feed_heartbeat")]
    pub heartbeat_ms: u64,
    /// Event streams open at once; more are refused with 503.
    #[serde(default = "default_feed_streams")]
    pub max_streams: usize,
    /// Event streams one user token may hold open (the service credential is not counted).
    #[serde(default = "default_feed_streams_per_user")]
    pub max_streams_per_user: usize,
    #[serde(default)]
    pub webhooks: Webhooks,
}

fn default_feed_heartbeat() -> u64 {
    15_000
}

fn default_feed_streams() -> usize {
    1000
}

fn default_feed_streams_per_user() -> usize {
    10
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            heartbeat_ms: default_feed_heartbeat(),
            max_streams: default_feed_streams(),
            max_streams_per_user: default_feed_streams_per_user(),
            webhooks: Webhooks::default(),
        }
    }
}

/// Webhook delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Webhooks {
    /// Subscriptions of the configuration (the API adds others).
    #[serde(default)]
    pub subscriptions: Vec<WebhookSubscription>,
    /// Hosts webhook URLs may name (`example.com`, or `*.example.com` for its subdomains);
    /// empty: any host.
    #[serde(default)]
    pub allowed_hosts: Peers,
    /// Attempts per delivery before it is dead-lettered.
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
    /// Back-off between attempts: from this, doubling (with jitter)...
    #[serde(default = "default_webhook_backoff_min")]
    pub backoff_min_ms: u64,
    /// ...up to this.
    #[serde(default = "default_webhook_backoff_max")]
    pub backoff_max_ms: u64,
    /// One attempt's timeout.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
    /// Requests in flight to one endpoint at most.
    #[serde(default = "default_webhook_concurrency")]
    pub concurrency: usize,
}

/// A subscription from the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WebhookSubscription {
    pub id: String,
    pub url: String,
    /// `whsec_` and base64, as Standard Webhooks secrets are written.
    pub secret: String,
    #[serde(default)]
    pub runs: Option<Vec<String>>,
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
}

fn default_webhook_attempts() -> u32 {
    12
}

fn default_webhook_backoff_min() -> u64 {
    1_000
}

fn default_webhook_backoff_max() -> u64 {
    3_600_000
}

fn default_webhook_timeout() -> u64 {
    10_000
}

fn default_webhook_concurrency() -> usize {
    4
}

impl Default for Webhooks {
    fn default() -> Self {
        Webhooks {
            subscriptions: Vec::new(),
            allowed_hosts: Peers::default(),
            max_attempts: default_webhook_attempts(),
            backoff_min_ms: default_webhook_backoff_min(),
            backoff_max_ms: default_webhook_backoff_max(),
            timeout_ms: default_webhook_timeout(),
            concurrency: default_webhook_concurrency(),
        }
    }
}

/// The node's memory budget for what others send it, sized by default for a 512 MiB pod.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Memory {
    /// Bytes of incoming WebSocket messages and request bodies the node holds in all while
    /// they arrive; past it new ones are refused (1013, 503) and what is held is served.
    #[serde(default = "default_incoming_bytes")]
    pub incoming_bytes: usize,
    /// Bytes queued for browser sessions and automerge-repo connections in all; past half of
    /// it ephemeral messages are dropped, past all of it a session already behind is closed.
    #[serde(default = "default_outgoing_bytes")]
    pub outgoing_bytes: usize,
    /// How long one WebSocket message or request body may take to arrive once begun.
    #[serde(default = "default_message_deadline")]
    pub message_deadline_ms: u64,
    /// Runs held in memory at most; past it the least recently used idle ones are unloaded
    /// (and load again on demand).
    #[serde(default = "default_max_loaded_runs")]
    pub max_loaded_runs: usize,
    /// Automerge operations held by loaded runs in all (~185 bytes each); past it the least
    /// recently used idle runs unload and clients' changes wait (1013).
    #[serde(default = "default_max_loaded_ops")]
    pub max_loaded_ops: u64,
    /// Operations clients and services may add to one run per second (peers are not held to
    /// it); past it their changes wait (1013, 503) until the run's bucket refills.
    #[serde(default = "default_max_run_ops_per_sec")]
    pub max_run_ops_per_sec: u64,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            incoming_bytes: default_incoming_bytes(),
            outgoing_bytes: default_outgoing_bytes(),
            message_deadline_ms: default_message_deadline(),
            max_loaded_runs: default_max_loaded_runs(),
            max_loaded_ops: default_max_loaded_ops(),
            max_run_ops_per_sec: default_max_run_ops_per_sec(),
        }
    }
}

fn default_incoming_bytes() -> usize {
    128 << 20
}

fn default_outgoing_bytes() -> usize {
    128 << 20
}

fn default_message_deadline() -> u64 {
    30_000
}

fn default_max_loaded_ops() -> u64 {
    1_500_000
}

fn default_max_run_ops_per_sec() -> u64 {
    200_000
}

fn default_max_loaded_runs() -> usize {
    5_000
}

/// What the WebSocket doors (`/ws`, `/ws/runs`, `/ws/automerge`) let in before a connection
/// has proved itself, and from where.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Admission {
    /// Unproven connections (before AUTH, JOIN or `join`) one address may hold at each door.
    #[serde(default = "default_pre_auth_per_address")]
    pub pre_auth_per_address: usize,
    /// ...and one network (/24, /64) at each door; at most half of a door's pool.
    #[serde(default = "default_pre_auth_per_range")]
    pub pre_auth_per_range: usize,
    /// Unproven connections each browser and automerge-repo door holds in all (the mesh
    /// door holds at most 64).
    #[serde(default = "default_pre_auth_total")]
    pub pre_auth_total: usize,
    /// How long a connection has to prove itself.
    #[serde(default = "default_pre_auth_timeout")]
    pub pre_auth_timeout_ms: u64,
    /// Origins whose pages may open `/ws/runs` and `/ws/automerge` (`*` for any). Empty:
    /// only pages served by this node (the Origin's host is the request's Host). Clients
    /// that send no Origin (services, not browsers) are not affected.
    #[serde(default)]
    pub allowed_origins: Peers,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            pre_auth_per_address: default_pre_auth_per_address(),
            pre_auth_per_range: default_pre_auth_per_range(),
            pre_auth_total: default_pre_auth_total(),
            pre_auth_timeout_ms: default_pre_auth_timeout(),
            allowed_origins: Peers::default(),
        }
    }
}

/// Sized for NAT: one office or one service's many clients share an address, and a burst of
/// them must get in at once (a flood is answered by eviction and the total, not by this).
fn default_pre_auth_per_address() -> usize {
    256
}

/// Half the default pool: a flood from one provider's network is refused once it holds that.
fn default_pre_auth_per_range() -> usize {
    512
}

fn default_pre_auth_total() -> usize {
    1024
}

fn default_pre_auth_timeout() -> u64 {
    5_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Mesh {
    #[serde(default)]
    pub peers: Peers,
    #[serde(default)]
    pub secret: Option<String>,
    /// A second secret whose proofs this node also accepts (it proves with `secret` only), so
    /// the mesh secret can be rotated with no link refused.
    #[serde(default)]
    pub accept_secret: Option<String>,
    /// A ping goes out this often on every link.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// A link silent this long (no frame, no pong) is declared dead and dropped.
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout_ms: u64,
    /// Reconnect back-off: first delay, and the cap it doubles up to (plus up to 100% jitter).
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// Largest WebSocket frame accepted from a peer (a full sync of a big run is one frame).
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            peers: Peers::default(),
            secret: None,
            accept_secret: None,
            heartbeat_ms: default_heartbeat(),
            peer_timeout_ms: default_peer_timeout(),
            reconnect_min_ms: default_reconnect_min(),
            reconnect_max_ms: default_reconnect_max(),
            max_frame_bytes: default_max_frame(),
        }
    }
}

fn default_heartbeat() -> u64 {
    5_000
}

fn default_peer_timeout() -> u64 {
    15_000
}

fn default_reconnect_min() -> u64 {
    250
}

fn default_reconnect_max() -> u64 {
    10_000
}

fn default_max_frame() -> usize {
    // Bigger runs and batches go over several frames; a small limit bounds what a peer can
    // make this node buffer, before and after its handshake. It must hold the largest single
    // change a client can make (a request body, in base64).
    8 * 1024 * 1024
}

/// Browser sessions (`/ws/runs/{runId}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Browser {
    /// Frames queued for one session; a session that lets more pile up is closed (it
    /// reconnects and resyncs).
    #[serde(default = "default_session_queue")]
    pub queue_frames: usize,
    /// Bytes queued for one session before it counts as too far behind (one frame is always
    /// let through, however big).
    #[serde(default = "default_session_bytes")]
    pub queue_bytes: usize,
    /// Open sessions this node accepts; more are refused with 503.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// A ping goes to every session this often; one silent for three times as long is closed.
    #[serde(default = "default_session_heartbeat")]
    pub heartbeat_ms: u64,
    /// Largest frame a browser may send.
    #[serde(default = "default_session_frame")]
    pub max_frame_bytes: usize,
}

impl Default for Browser {
    fn default() -> Self {
        Browser {
            queue_frames: default_session_queue(),
            queue_bytes: default_session_bytes(),
            max_sessions: default_max_sessions(),
            heartbeat_ms: default_session_heartbeat(),
            max_frame_bytes: default_session_frame(),
        }
    }
}

/// automerge-repo connections (`/ws/automerge`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AutomergeRepo {
    /// Messages queued for one connection; one that lets more pile up is closed (the client
    /// reconnects and its sync resumes from what both sides hold).
    #[serde(default = "default_repo_queue")]
    pub queue_frames: usize,
    /// Bytes queued for one connection: past three quarters, ephemeral messages to it are
    /// dropped; a sync message past the whole closes it as too slow.
    #[serde(default = "default_session_bytes")]
    pub queue_bytes: usize,
    /// Open connections this node accepts; more are refused with 503.
    #[serde(default = "default_max_sessions")]
    pub max_connections: usize,
    /// A ping goes to every connection this often; one silent for three times as long is closed.
    #[serde(default = "default_session_heartbeat")]
    pub heartbeat_ms: u64,
    /// Largest message a client may send (a first sync of a big run is one message).
    #[serde(default = "default_repo_frame")]
    pub max_frame_bytes: usize,
    /// Documents one connection may open.
    #[serde(default = "default_repo_docs")]
    pub max_documents: usize,
    /// Commits to a run within this long of the last push to its clients go out together.
    #[serde(default = "default_repo_push_delay")]
    pub push_delay_ms: u64,
}

impl Default for AutomergeRepo {
    fn default() -> Self {
        AutomergeRepo {
            queue_frames: default_repo_queue(),
            queue_bytes: default_session_bytes(),
            max_connections: default_max_sessions(),
            heartbeat_ms: default_session_heartbeat(),
            max_frame_bytes: default_repo_frame(),
            max_documents: default_repo_docs(),
            push_delay_ms: default_repo_push_delay(),
        }
    }
}

fn default_repo_queue() -> usize {
    1024
}

fn default_repo_frame() -> usize {
    16 * 1024 * 1024
}

fn default_repo_push_delay() -> u64 {
    50
}

fn default_repo_docs() -> usize {
    1_000
}

fn default_session_queue() -> usize {
    256
}

fn default_session_bytes() -> usize {
    16 * 1024 * 1024
}

fn default_max_sessions() -> usize {
    20_000
}

fn default_session_heartbeat() -> u64 {
    15_000
}

fn default_session_frame() -> usize {
    256 * 1024
}

/// Peers as the seed writes them (one comma-separated string) or as a YAML list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Peers {
    List(Vec<String>),
    Csv(String),
}

impl Default for Peers {
    fn default() -> Self {
        Peers::List(Vec::new())
    }
}

impl Peers {
    pub fn urls(&self) -> Vec<String> {
        let items: Vec<&str> = match self {
            Peers::List(v) => v.iter().map(String::as_str).collect(),
            Peers::Csv(s) => s.split(',').collect(),
        };
        items
            .into_iter()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Api {
    /// The static service credential: full access to every run.
    #[serde(default)]
    pub token: Option<String>,
    /// Signed user tokens (JWT), when any key is configured.
    #[serde(default)]
    pub jwt: JwtSettings,
    /// The credential a metrics scraper presents; with it the scrape and the health report
    /// name runs (see `http::scrape`).
    #[serde(default)]
    pub metrics_token: Option<String>,
}

/// Where the keys that sign user tokens come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct JwtSettings {
    /// A shared secret for HS256 tokens.
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// A JWKS file (RS256, EdDSA, ES256 public keys).
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// A JWKS URL, fetched at start and every `jwks-refresh-secs`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
    /// Clock skew allowed when checking `exp`, `nbf` and `iat`.
    #[serde(default = "default_jwt_leeway")]
    pub leeway_secs: u64,
    /// The longest a token may still be valid for: a later `exp` is refused (a token that
    /// never expires cannot be taken back).
    #[serde(default = "default_jwt_max_lifetime")]
    pub max_lifetime_secs: u64,
    /// When set, a token's `iss` must be this.
    #[serde(default)]
    pub issuer: Option<String>,
    /// When set, a token's `aud` must name this.
    #[serde(default)]
    pub audience: Option<String>,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            hs256_secret: None,
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_secs: default_jwks_refresh(),
            leeway_secs: default_jwt_leeway(),
            max_lifetime_secs: default_jwt_max_lifetime(),
            issuer: None,
            audience: None,
        }
    }
}

fn default_jwks_refresh() -> u64 {
    300
}

fn default_jwt_leeway() -> u64 {
    30
}

/// Seven days.
fn default_jwt_max_lifetime() -> u64 {
    7 * 24 * 3600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SnapshotSettings {
    #[serde(default = "default_every")]
    pub every_events: u64,
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// A run is snapshotted at most this often, however fast it is written.
    #[serde(default = "default_min_interval")]
    pub min_interval_ms: u64,
    /// Runs of at most this many changes are snapshotted from a copy of their document (which
    /// pauses the run for the copy: 1.8 ms at 10,000 changes); larger ones, or all with 0, are
    /// rebuilt from storage instead.
    #[serde(default = "default_copy_max_changes")]
    pub copy_max_changes: u64,
}

fn default_copy_max_changes() -> u64 {
    20_000
}

fn default_min_interval() -> u64 {
    1000
}

fn default_every() -> u64 {
    100
}

fn default_keep() -> usize {
    10
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            every_events: default_every(),
            keep: default_keep(),
            min_interval_ms: default_min_interval(),
            copy_max_changes: default_copy_max_changes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunSettings {
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// How long a deleted run's events and snapshots are kept (and the run can be restored)
    /// before they are purged.
    #[serde(default = "default_deletion_grace")]
    pub deletion_grace_secs: u64,
    /// How often the node looks for deleted runs past their grace period.
    #[serde(default = "default_purge_every")]
    pub purge_every_secs: u64,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            idle_timeout_secs: default_idle(),
            deletion_grace_secs: default_deletion_grace(),
            purge_every_secs: default_purge_every(),
        }
    }
}

fn default_idle() -> u64 {
    300
}

fn default_deletion_grace() -> u64 {
    7 * 24 * 3600
}

fn default_purge_every() -> u64 {
    600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Server {
    pub bind: String,
    pub port: u16,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// On SIGTERM, how long open connections get to finish before the node exits.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
}

fn default_grace() -> u64 {
    25
}

fn default_max_body() -> usize {
    4 * 1024 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Database {
    pub url: String,
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// PostgreSQL: create the URL's database when it does not exist (one per pod on a shared
    /// server; the user needs CREATEDB).
    #[serde(default)]
    pub create_if_missing: bool,
    /// PostgreSQL: give each node a database of its own on the URL's server, named
    /// `<database>_<node id>` (pods of a StatefulSet sharing one secret URL).
    #[serde(default)]
    pub per_node: bool,
    /// A write transaction not done in this time counts as the database out of reach (503).
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
}

fn default_write_timeout() -> u64 {
    10_000
}

fn default_pool() -> usize {
    8
}

/// `postgres://…/db?params` → `postgres://…/db_<node id>?params`, the node id reduced to
/// lowercase letters, digits and `_`.
fn per_node_url(url: &str, node_id: &str) -> Result<String, ConfigError> {
    let key = "database.per-node";
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(key, "applies to postgres:// URLs only"));
    }
    let mut parsed =
        url::Url::parse(url).map_err(|e| invalid("database.url", format!("not a URL: {e}")))?;
    let db = parsed.path().trim_start_matches('/').to_string();
    if db.is_empty() || db.contains('/') {
        return Err(invalid(key, "the URL must name a database (…/NAME)"));
    }
    let suffix: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("{db}_{suffix}");
    if name.len() > 63 {
        return Err(invalid(
            key,
            format!("{name:?} is longer than PostgreSQL's 63-byte names"),
        ));
    }
    parsed.set_path(&format!("/{name}"));
    Ok(parsed.to_string())
}

/// Plain environment variable names (the seed's and the operators') and the keys they set.
const ENV_KEYS: &[(&str, &str)] = &[
    ("REGION", "crdt.region"),
    ("NODE_ID", "crdt.node-id"),
    ("CRDT_MESH_PEERS", "crdt.mesh.peers"),
    ("CRDT_MESH_SECRET", "crdt.mesh.secret"),
    ("CRDT_MESH_ACCEPT_SECRET", "crdt.mesh.accept-secret"),
    ("CRDT_MESH_HEARTBEAT_MS", "crdt.mesh.heartbeat-ms"),
    ("CRDT_MESH_PEER_TIMEOUT_MS", "crdt.mesh.peer-timeout-ms"),
    ("CRDT_MESH_RECONNECT_MIN_MS", "crdt.mesh.reconnect-min-ms"),
    ("CRDT_MESH_RECONNECT_MAX_MS", "crdt.mesh.reconnect-max-ms"),
    ("CRDT_MESH_MAX_FRAME_BYTES", "crdt.mesh.max-frame-bytes"),
    ("CRDT_API_TOKEN", "crdt.api.token"),
    ("CRDT_METRICS_TOKEN", "crdt.api.metrics-token"),
    ("CRDT_JWT_HS256_SECRET", "crdt.api.jwt.hs256-secret"),
    ("CRDT_JWKS_FILE", "crdt.api.jwt.jwks-file"),
    ("CRDT_JWKS_URL", "crdt.api.jwt.jwks-url"),
    ("CRDT_JWKS_REFRESH_SECS", "crdt.api.jwt.jwks-refresh-secs"),
    ("CRDT_JWT_ISSUER", "crdt.api.jwt.issuer"),
    ("CRDT_JWT_AUDIENCE", "crdt.api.jwt.audience"),
    (
        "CRDT_JWT_MAX_LIFETIME_SECS",
        "crdt.api.jwt.max-lifetime-secs",
    ),
    ("CRDT_BROWSER_QUEUE_FRAMES", "crdt.browser.queue-frames"),
    ("CRDT_BROWSER_QUEUE_BYTES", "crdt.browser.queue-bytes"),
    ("CRDT_BROWSER_MAX_SESSIONS", "crdt.browser.max-sessions"),
    ("CRDT_BROWSER_HEARTBEAT_MS", "crdt.browser.heartbeat-ms"),
    (
        "CRDT_BROWSER_MAX_FRAME_BYTES",
        "crdt.browser.max-frame-bytes",
    ),
    ("CRDT_AUTOMERGE_QUEUE_FRAMES", "crdt.automerge.queue-frames"),
    ("CRDT_AUTOMERGE_QUEUE_BYTES", "crdt.automerge.queue-bytes"),
    (
        "CRDT_AUTOMERGE_MAX_CONNECTIONS",
        "crdt.automerge.max-connections",
    ),
    ("CRDT_AUTOMERGE_HEARTBEAT_MS", "crdt.automerge.heartbeat-ms"),
    (
        "CRDT_AUTOMERGE_MAX_FRAME_BYTES",
        "crdt.automerge.max-frame-bytes",
    ),
    (
        "CRDT_AUTOMERGE_MAX_DOCUMENTS",
        "crdt.automerge.max-documents",
    ),
    (
        "CRDT_AUTOMERGE_PUSH_DELAY_MS",
        "crdt.automerge.push-delay-ms",
    ),
    ("CRDT_SNAPSHOT_EVERY", "crdt.snapshot.every-events"),
    ("CRDT_SNAPSHOT_KEEP", "crdt.snapshot.keep"),
    (
        "CRDT_SNAPSHOT_MIN_INTERVAL_MS",
        "crdt.snapshot.min-interval-ms",
    ),
    (
        "CRDT_SNAPSHOT_COPY_MAX_CHANGES",
        "crdt.snapshot.copy-max-changes",
    ),
    ("CRDT_RUN_IDLE_SECS", "crdt.runs.idle-timeout-secs"),
    ("CRDT_DELETION_GRACE_SECS", "crdt.runs.deletion-grace-secs"),
    ("CRDT_PURGE_EVERY_SECS", "crdt.runs.purge-every-secs"),
    ("CRDT_MEMORY_INCOMING_BYTES", "crdt.memory.incoming-bytes"),
    ("CRDT_MEMORY_OUTGOING_BYTES", "crdt.memory.outgoing-bytes"),
    (
        "CRDT_MESSAGE_DEADLINE_MS",
        "crdt.memory.message-deadline-ms",
    ),
    ("CRDT_MAX_LOADED_RUNS", "crdt.memory.max-loaded-runs"),
    ("CRDT_MAX_LOADED_OPS", "crdt.memory.max-loaded-ops"),
    (
        "CRDT_MAX_RUN_OPS_PER_SEC",
        "crdt.memory.max-run-ops-per-sec",
    ),
    (
        "CRDT_PRE_AUTH_PER_ADDRESS",
        "crdt.admission.pre-auth-per-address",
    ),
    ("CRDT_PRE_AUTH_TOTAL", "crdt.admission.pre-auth-total"),
    (
        "CRDT_PRE_AUTH_PER_RANGE",
        "crdt.admission.pre-auth-per-range",
    ),
    (
        "CRDT_PRE_AUTH_TIMEOUT_MS",
        "crdt.admission.pre-auth-timeout-ms",
    ),
    ("CRDT_ALLOWED_ORIGINS", "crdt.admission.allowed-origins"),
    ("CRDT_FEED_HEARTBEAT_MS", "crdt.feed.heartbeat-ms"),
    ("CRDT_FEED_MAX_STREAMS", "crdt.feed.max-streams"),
    (
        "CRDT_FEED_MAX_STREAMS_PER_USER",
        "crdt.feed.max-streams-per-user",
    ),
    (
        "CRDT_WEBHOOK_MAX_ATTEMPTS",
        "crdt.feed.webhooks.max-attempts",
    ),
    (
        "CRDT_WEBHOOK_BACKOFF_MIN_MS",
        "crdt.feed.webhooks.backoff-min-ms",
    ),
    (
        "CRDT_WEBHOOK_BACKOFF_MAX_MS",
        "crdt.feed.webhooks.backoff-max-ms",
    ),
    ("CRDT_WEBHOOK_TIMEOUT_MS", "crdt.feed.webhooks.timeout-ms"),
    (
        "CRDT_WEBHOOK_ALLOWED_HOSTS",
        "crdt.feed.webhooks.allowed-hosts",
    ),
    ("DATABASE_URL", "database.url"),
    ("DATABASE_POOL_SIZE", "database.pool-size"),
    ("BIND", "server.bind"),
    ("PORT", "server.port"),
    ("CRDT_MAX_BODY_BYTES", "server.max-body-bytes"),
    ("CRDT_SHUTDOWN_GRACE_SECS", "server.shutdown-grace-secs"),
    ("DATABASE_CREATE_IF_MISSING", "database.create-if-missing"),
    ("DATABASE_PER_NODE", "database.per-node"),
    ("DATABASE_WRITE_TIMEOUT_MS", "database.write-timeout-ms"),
    ("CRDT_CLUSTER", "crdt.cluster.enabled"),
    ("CRDT_CLUSTER_ADVERTISE_URL", "crdt.cluster.advertise-url"),
    ("CRDT_CLUSTER_LEASE_MS", "crdt.cluster.lease-ms"),
    ("CRDT_CLUSTER_SECRET", "crdt.cluster.secret"),
];

impl Settings {
    /// Loads from the file `CRDT_CONFIG` names (default `config/application.yml`, optional)
    /// and the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let path = std::env::var("CRDT_CONFIG").unwrap_or_else(|_| "config/application.yml".into());
        let required = std::env::var("CRDT_CONFIG").is_ok();
        Self::load_from(&path, required, |k| std::env::var(k).ok())
    }

    /// Loads from `path` with environment lookups through `env` (tests pass a map).
    pub fn load_from(
        path: &str,
        required: bool,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .set_default("crdt.region", "us-east-1")?
            .set_default("server.bind", "127.0.0.1")?
            .set_default("server.port", 8080)?
            .set_default("database.url", "sqlite://./data/crdt-node.db")?
            .add_source(config::File::new(path, config::FileFormat::Yaml).required(required));
        for (var, key) in ENV_KEYS {
            if let Some(value) = env(var) {
                builder = builder.set_override(*key, value)?;
            }
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()
    }

    fn validate(mut self) -> Result<Self, ConfigError> {
        self.validate_identity()?;
        self.validate_mesh()?;
        self.validate_api()?;
        self.validate_automerge()?;
        self.validate_browser()?;
        self.validate_feed()?;
        self.validate_runtime()?;
        self.validate_server()?;
        self.validate_database()?;
        Ok(self)
    }

    /// The region (as the event log stores it) and the node id (defaulting to the host name).
    fn validate_identity(&mut self) -> Result<(), ConfigError> {
        let region = &self.crdt.region;
        if !run_doc::rules::is_region(region) {
            return Err(invalid(
                "crdt.region",
                format!("{region:?} must be 1-50 characters of letters, digits, '-' or '_'"),
            ));
        }
        let node_id = self
            .crdt
            .node_id
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| format!("{region}-node"));
        if !run_doc::rules::is_node_id(&node_id) {
            return Err(invalid(
                "crdt.node-id",
                format!("{node_id:?} must be 1-100 printable characters without spaces"),
            ));
        }
        self.crdt.node_id = Some(node_id);
        Ok(())
    }

    /// Peers, secrets, timings and frame size of the mesh.
    fn validate_mesh(&mut self) -> Result<(), ConfigError> {
        for peer in self.crdt.mesh.peers.urls() {
            let parsed = url::Url::parse(&peer)
                .map_err(|e| invalid("crdt.mesh.peers", format!("{peer:?} is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "ws" | "wss") {
                return Err(invalid(
                    "crdt.mesh.peers",
                    format!("{peer:?} must be a ws:// or wss:// URL"),
                ));
            }
        }
        if self.crdt.mesh.secret.as_deref() == Some("") {
            self.crdt.mesh.secret = None;
        }
        if self.crdt.mesh.accept_secret.as_deref() == Some("") {
            self.crdt.mesh.accept_secret = None;
        }
        if !self.crdt.mesh.peers.urls().is_empty() && self.crdt.mesh.secret.is_none() {
            return Err(invalid(
                "crdt.mesh.secret",
                "peers are configured but no mesh secret is: set CRDT_MESH_SECRET on every node",
            ));
        }
        let mesh = &self.crdt.mesh;
        if mesh.heartbeat_ms == 0 || mesh.peer_timeout_ms <= mesh.heartbeat_ms {
            return Err(invalid(
                "crdt.mesh.peer-timeout-ms",
                "must be above crdt.mesh.heartbeat-ms, which must be at least 1",
            ));
        }
        if mesh.reconnect_min_ms == 0 || mesh.reconnect_max_ms < mesh.reconnect_min_ms {
            return Err(invalid(
                "crdt.mesh.reconnect-max-ms",
                "must be at least crdt.mesh.reconnect-min-ms, which must be at least 1",
            ));
        }
        if mesh.max_frame_bytes < 64 * 1024 {
            return Err(invalid(
                "crdt.mesh.max-frame-bytes",
                "must be at least 65536",
            ));
        }
        Ok(())
    }

    /// Empty credentials count as none; a JWKS URL must be http(s).
    fn validate_api(&mut self) -> Result<(), ConfigError> {
        let api = &mut self.crdt.api;
        for value in [
            &mut api.token,
            &mut api.metrics_token,
            &mut api.jwt.hs256_secret,
            &mut api.jwt.jwks_file,
            &mut api.jwt.jwks_url,
            &mut api.jwt.issuer,
            &mut api.jwt.audience,
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *value = None;
            }
        }
        if let Some(url) = &api.jwt.jwks_url {
            let parsed = url::Url::parse(url)
                .map_err(|e| invalid("crdt.api.jwt.jwks-url", format!("{url:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid("crdt.api.jwt.jwks-url", "must be an http(s) URL"));
            }
        }
        if api.jwt.max_lifetime_secs < 60 {
            return Err(invalid(
                "crdt.api.jwt.max-lifetime-secs",
                "must be at least 60",
            ));
        }
        if api.jwt.jwks_refresh_secs < 10 {
            return Err(invalid(
                "crdt.api.jwt.jwks-refresh-secs",
                "must be at least 10",
            ));
        }
        Ok(())
    }

    /// Limits of the automerge-repo door.
    fn validate_automerge(&mut self) -> Result<(), ConfigError> {
        let repo = &self.crdt.automerge;
        if repo.queue_frames < 4 {
            return Err(invalid("crdt.automerge.queue-frames", "must be at least 4"));
        }
        if repo.max_connections == 0 {
            return Err(invalid(
                "crdt.automerge.max-connections",
                "must be at least 1",
            ));
        }
        if repo.heartbeat_ms < 100 {
            return Err(invalid(
                "crdt.automerge.heartbeat-ms",
                "must be at least 100",
            ));
        }
        if repo.max_frame_bytes < 4096 {
            return Err(invalid(
                "crdt.automerge.max-frame-bytes",
                "must be at least 4096",
            ));
        }
        if repo.push_delay_ms > 10_000 {
            return Err(invalid(
                "crdt.automerge.push-delay-ms",
                "must be at most 10000",
            ));
        }
        if repo.max_documents == 0 {
            return Err(invalid(
                "crdt.automerge.max-documents",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The change feed and webhooks.
    fn validate_feed(&mut self) -> Result<(), ConfigError> {
        let feed = &self.crdt.feed;
        if feed.heartbeat_ms < 100 {
            return Err(invalid("crdt.feed.heartbeat-ms", "must be at least 100"));
        }
        if feed.max_streams == 0 {
            return Err(invalid("crdt.feed.max-streams", "must be at least 1"));
        }
        if feed.max_streams_per_user == 0 {
            return Err(invalid(
                "crdt.feed.max-streams-per-user",
                "must be at least 1",
            ));
        }
        let hooks = &feed.webhooks;
        if hooks.max_attempts == 0 {
            return Err(invalid(
                "crdt.feed.webhooks.max-attempts",
                "must be at least 1",
            ));
        }
        if hooks.backoff_min_ms == 0 || hooks.backoff_max_ms < hooks.backoff_min_ms {
            return Err(invalid(
                "crdt.feed.webhooks.backoff-max-ms",
                "back-off must be at least 1 ms, and its maximum at least its minimum",
            ));
        }
        if hooks.timeout_ms < 100 {
            return Err(invalid(
                "crdt.feed.webhooks.timeout-ms",
                "must be at least 100",
            ));
        }
        if hooks.concurrency == 0 {
            return Err(invalid(
                "crdt.feed.webhooks.concurrency",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Limits of browser sessions.
    fn validate_browser(&mut self) -> Result<(), ConfigError> {
        let browser = &self.crdt.browser;
        if browser.queue_frames < 4 {
            return Err(invalid("crdt.browser.queue-frames", "must be at least 4"));
        }
        if browser.queue_bytes < 64 * 1024 {
            return Err(invalid(
                "crdt.browser.queue-bytes",
                "must be at least 65536",
            ));
        }
        if browser.max_sessions == 0 {
            return Err(invalid("crdt.browser.max-sessions", "must be at least 1"));
        }
        if browser.heartbeat_ms < 100 {
            return Err(invalid("crdt.browser.heartbeat-ms", "must be at least 100"));
        }
        if browser.max_frame_bytes < 4096 {
            return Err(invalid(
                "crdt.browser.max-frame-bytes",
                "must be at least 4096",
            ));
        }
        Ok(())
    }

    /// Snapshots and run lifetimes.
    fn validate_runtime(&mut self) -> Result<(), ConfigError> {
        if self.crdt.snapshot.every_events == 0 {
            return Err(invalid("crdt.snapshot.every-events", "must be at least 1"));
        }
        if self.crdt.snapshot.keep == 0 {
            return Err(invalid("crdt.snapshot.keep", "must be at least 1"));
        }
        if self.crdt.runs.idle_timeout_secs == 0 {
            return Err(invalid("crdt.runs.idle-timeout-secs", "must be at least 1"));
        }
        if self.crdt.runs.purge_every_secs == 0 {
            return Err(invalid("crdt.runs.purge-every-secs", "must be at least 1"));
        }
        let memory = &self.crdt.memory;
        if memory.incoming_bytes < self.server.max_body_bytes {
            return Err(invalid(
                "crdt.memory.incoming-bytes",
                "must be at least server.max-body-bytes (one largest request)",
            ));
        }
        if memory.outgoing_bytes < 1 << 20 {
            return Err(invalid(
                "crdt.memory.outgoing-bytes",
                "must be at least 1 MiB",
            ));
        }
        if !(1_000..=3_600_000).contains(&memory.message_deadline_ms) {
            return Err(invalid(
                "crdt.memory.message-deadline-ms",
                "must be from 1000 to 3600000 (an hour)",
            ));
        }
        if memory.max_loaded_ops < 100_000 {
            return Err(invalid(
                "crdt.memory.max-loaded-ops",
                "must be at least 100000",
            ));
        }
        if memory.max_run_ops_per_sec < 10_000 {
            return Err(invalid(
                "crdt.memory.max-run-ops-per-sec",
                "must be at least 10000",
            ));
        }
        if memory.max_loaded_runs == 0 {
            return Err(invalid("crdt.memory.max-loaded-runs", "must be at least 1"));
        }
        Ok(())
    }

    /// The HTTP server, admission of unproven WebSockets, and a frame for any body.
    fn validate_server(&mut self) -> Result<(), ConfigError> {
        self.server.bind.parse::<IpAddr>().map_err(|e| {
            invalid(
                "server.bind",
                format!("{:?} is not an IP address: {e}", self.server.bind),
            )
        })?;
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max-body-bytes", "must be at least 1024"));
        }
        let admission = &self.crdt.admission;
        if admission.pre_auth_per_address == 0 || admission.pre_auth_total == 0 {
            return Err(invalid(
                "crdt.admission",
                "pre-auth-per-address and pre-auth-total must be at least 1",
            ));
        }
        if admission.pre_auth_per_range < admission.pre_auth_per_address {
            return Err(invalid(
                "crdt.admission.pre-auth-per-range",
                "must be at least pre-auth-per-address (a network holds that address)",
            ));
        }
        if !(100..=600_000).contains(&admission.pre_auth_timeout_ms) {
            return Err(invalid(
                "crdt.admission.pre-auth-timeout-ms",
                "must be between 100 and 600000",
            ));
        }
        let needed = self.server.max_body_bytes.div_ceil(3) * 4 + 1024;
        if self.crdt.mesh.max_frame_bytes < needed {
            return Err(invalid(
                "crdt.mesh.max-frame-bytes",
                format!(
                    "must be at least {needed} (4/3 of server.max-body-bytes, plus 1 KiB), so \
                     any change a client can make fits one frame"
                ),
            ));
        }
        Ok(())
    }

    /// The database URL (per node when asked), pool and write timeout.
    fn validate_database(&mut self) -> Result<(), ConfigError> {
        if self.database.url.trim().is_empty() {
            return Err(invalid("database.url", "must not be empty"));
        }
        if self.database.write_timeout_ms < 100 {
            return Err(invalid("database.write-timeout-ms", "must be at least 100"));
        }
        if self.server.shutdown_grace_secs == 0 {
            return Err(invalid("server.shutdown-grace-secs", "must be at least 1"));
        }
        if self.database.per_node {
            self.database.url = per_node_url(&self.database.url, self.node_id())?;
        }
        if self.database.pool_size == 0 {
            return Err(invalid("database.pool-size", "must be at least 1"));
        }
        self.validate_cluster()
    }

    /// A shared database is PostgreSQL's, one for the region (not per node).
    fn validate_cluster(&mut self) -> Result<(), ConfigError> {
        let cluster = &mut self.crdt.cluster;
        if !cluster.enabled {
            return Ok(());
        }
        let url = &self.database.url;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "crdt.cluster.enabled",
                "pods share a PostgreSQL database: database.url must be postgres://…",
            ));
        }
        if self.database.per_node {
            return Err(invalid(
                "database.per-node",
                "pods of a cluster share one database; turn per-node off",
            ));
        }
        if cluster.secret.as_deref().is_none_or(|s| s.len() < 16) {
            return Err(invalid(
                "crdt.cluster.secret",
                "the region's pods prove their calls to each other with it: at least 16 characters",
            ));
        }
        if !(1_000..=60_000).contains(&cluster.lease_ms) {
            return Err(invalid(
                "crdt.cluster.lease-ms",
                "must be between 1000 and 60000",
            ));
        }
        let advertise = cluster.advertise_url.clone().filter(|u| !u.is_empty());
        let advertise = advertise.unwrap_or_else(|| {
            format!(
                "http://{}:{}",
                self.crdt.node_id.as_deref().unwrap_or("localhost"),
                self.server.port
            )
        });
        let parsed = url::Url::parse(&advertise).map_err(|e| {
            invalid(
                "crdt.cluster.advertise-url",
                format!("{advertise:?} is not a URL: {e}"),
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid(
                "crdt.cluster.advertise-url",
                format!("{advertise:?} must be an http:// or https:// URL with a host"),
            ));
        }
        cluster.advertise_url = Some(advertise.trim_end_matches('/').to_string());
        Ok(())
    }

    /// The configured peers, less any that name this node itself (`ws://NODE_ID…` or
    /// `ws://NODE_ID.…`), so that every pod of a StatefulSet can share one peer list.
    pub fn peer_urls(&self) -> Vec<String> {
        let me = self.node_id();
        self.crdt
            .mesh
            .peers
            .urls()
            .into_iter()
            .filter(|peer| {
                let host = url::Url::parse(peer)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_default();
                let own = host == me || host.starts_with(&format!("{me}."));
                if own {
                    log::info!("mesh: skipping peer {peer}: it is this node");
                }
                !own
            })
            .collect()
    }

    pub fn node_id(&self) -> &str {
        self.crdt.node_id.as_deref().unwrap_or("crdt-node")
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.crdt.runs.idle_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("application.yml");
        std::fs::write(&path, yaml).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(path.to_str().unwrap(), true, |k| env.get(k).cloned())
    }

    #[test]
    fn the_shipped_file_loads() {
        let s = Settings::load_from("config/application.yml", true, |_| None).unwrap();
        assert_eq!(s.crdt.region, "us-east-1");
        assert_eq!(s.crdt.snapshot.every_events, 100);
        assert_eq!(s.crdt.snapshot.keep, 10);
        assert_eq!((s.server.bind.as_str(), s.server.port), ("127.0.0.1", 8080));
    }

    /// The file the Kubernetes pods mount, with the environment their StatefulSet sets.
    #[test]
    fn the_kubernetes_config_loads() {
        let env = [
            ("REGION", "eu-central-1"),
            ("NODE_ID", "crdt-node-1"),
            (
                "CRDT_MESH_PEERS",
                "ws://crdt-node-0.h:8080/ws,wss://crdt.us-east-1.example.com/ws",
            ),
            ("CRDT_MESH_SECRET", "s"),
            ("CRDT_API_TOKEN", "t"),
            ("DATABASE_URL", "postgres://crdt:pw@pg:5432/crdt_1"),
            ("CRDT_SHUTDOWN_GRACE_SECS", "25"),
        ];
        let s = Settings::load_from("k8s/base/application.yml", true, |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        assert_eq!(s.crdt.region, "eu-central-1");
        assert_eq!(s.server.bind, "0.0.0.0");
        assert!(s.database.create_if_missing);
        assert_eq!(s.peer_urls().len(), 2);
        assert_eq!(s.server.shutdown_grace_secs, 25);
    }

    #[test]
    fn a_pod_skips_itself_in_a_shared_peer_list() {
        let peers = "ws://crdt-node-0.crdt-node-headless:8080/ws,ws://crdt-node-1.crdt-node-headless:8080/ws,wss://crdt-eu.example.com/ws";
        let env = [
            ("NODE_ID", "crdt-node-1"),
            ("CRDT_MESH_PEERS", peers),
            ("CRDT_MESH_SECRET", "s"),
            ("CRDT_SHUTDOWN_GRACE_SECS", "40"),
            ("DATABASE_CREATE_IF_MISSING", "true"),
        ];
        let s = load("crdt:\n  region: us-east-1\n", &env).unwrap();
        assert_eq!(
            s.peer_urls(),
            vec![
                "ws://crdt-node-0.crdt-node-headless:8080/ws",
                "wss://crdt-eu.example.com/ws"
            ]
        );
        assert_eq!(s.server.shutdown_grace_secs, 40);
        assert!(s.database.create_if_missing);
    }

    #[test]
    fn a_node_gets_a_database_of_its_own() {
        let env = |url: &'static str| {
            [
                ("NODE_ID", "crdt-node-us-east-1-0"),
                ("DATABASE_URL", url),
                ("DATABASE_PER_NODE", "true"),
            ]
        };
        let yaml = "crdt:\n  region: us-east-1\n";
        let s = load(yaml, &env("postgres://u:p@db:5432/crdt?sslmode=require")).unwrap();
        assert_eq!(
            s.database.url,
            "postgres://u:p@db:5432/crdt_crdt_node_us_east_1_0?sslmode=require"
        );
        assert!(
            load(yaml, &env("postgres://u@db:5432")).is_err(),
            "no database named"
        );
        assert!(load(yaml, &env("sqlite://x.db")).is_err());
    }

    #[test]
    fn seed_layout_and_environment_overrides() {
        let yaml = "crdt:\n  mesh:\n    peers: wss://us-west.atlasia.ai/ws,wss://eu-central.atlasia.ai/ws\n    secret: s\n  region: us-east-1\n";
        let s = load(yaml, &[]).unwrap();
        assert_eq!(
            s.crdt.mesh.peers.urls(),
            vec![
                "wss://us-west.atlasia.ai/ws",
                "wss://eu-central.atlasia.ai/ws"
            ]
        );
        let s = load(
            yaml,
            &[
                ("REGION", "eu-central-1"),
                ("PORT", "9090"),
                ("BIND", "0.0.0.0"),
                ("CRDT_MESH_PEERS", "ws://a:1/ws, ws://b:2/ws"),
                ("DATABASE_URL", "postgres://x@y/z"),
                ("CRDT_API_TOKEN", "t"),
                ("CRDT_SNAPSHOT_EVERY", "7"),
                ("NODE_ID", "n1"),
            ],
        )
        .unwrap();
        assert_eq!(s.crdt.region, "eu-central-1");
        assert_eq!(s.server.port, 9090);
        assert_eq!(s.server.bind, "0.0.0.0");
        assert_eq!(s.crdt.mesh.peers.urls(), vec!["ws://a:1/ws", "ws://b:2/ws"]);
        assert_eq!(s.database.url, "postgres://x@y/z");
        assert_eq!(s.crdt.api.token.as_deref(), Some("t"));
        assert_eq!(s.crdt.snapshot.every_events, 7);
        assert_eq!(s.node_id(), "n1");
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                "crdt:\n  region: us-east-1\n",
                &[("PORT", "eighty")],
                "port",
            ),
            ("crdt:\n  region: us-east-1\n", &[("PORT", "70000")], "port"),
            ("crdt:\n  region: 'us east'\n", &[], "crdt.region"),
            (
                "crdt:\n  region: r\n",
                &[("BIND", "localhost:1")],
                "server.bind",
            ),
            (
                "crdt:\n  region: r\n",
                &[("CRDT_MESH_PEERS", "http://x/ws")],
                "crdt.mesh.peers",
            ),
            (
                "crdt:\n  region: r\n",
                &[("CRDT_SNAPSHOT_EVERY", "0")],
                "crdt.snapshot.every-events",
            ),
            (
                "crdt:\n  region: r\n",
                &[("CRDT_SNAPSHOT_KEEP", "-1")],
                "keep",
            ),
            ("crdt:\n  region: r\n  regoin: x\n", &[], "regoin"),
            (
                "crdt:\n  region: r\n",
                &[("CRDT_MESH_PEERS", "ws://x/ws")],
                "crdt.mesh.secret",
            ),
            (
                "crdt:\n  region: r\n",
                &[("CRDT_MESH_HEARTBEAT_MS", "20000")],
                "crdt.mesh.peer-timeout-ms",
            ),
            (
                "crdt:\n  region: r\n",
                &[("CRDT_MESH_RECONNECT_MAX_MS", "10")],
                "crdt.mesh.reconnect-max-ms",
            ),
            (
                "crdt:\n  region: r\n",
                &[("CRDT_MESH_MAX_FRAME_BYTES", "65536")],
                "crdt.mesh.max-frame-bytes",
            ),
        ];
        for (yaml, env, key) in cases {
            let err = load(yaml, env).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "{yaml:?} {env:?}: {err:?} should name {key}"
            );
        }
    }
}
