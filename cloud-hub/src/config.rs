//! Hub configuration: a TOML file parsed into [`Config`], then checked by
//! [`Config::validate`].
//!
//! Every key has a default, so an empty file (or no file at all) is a valid
//! configuration for a hub talking to a broker on localhost. Unknown keys are errors,
//! so a typo never silently falls back to a default. `config.example.toml` at the
//! crate root documents every key and is loaded by a unit test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key or a value of the wrong type. The message from
    /// `toml` names the key and shows the offending line.
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value that parsed but is not acceptable.
    #[error("invalid config key `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the key, e.g. `mqtt.port`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

/// The whole hub configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory holding the hub's SQLite database (`hub.db`). Created if missing. Not
    /// used by the PostgreSQL backend.
    pub data_dir: PathBuf,
    /// Which database stores batches and readings.
    pub storage: StorageConfig,
    /// MQTT broker connection.
    pub mqtt: MqttConfig,
    /// HTTP API.
    pub http: HttpConfig,
    /// Batch ingestion.
    pub ingest: IngestConfig,
    /// How long raw readings are kept.
    pub retention: RetentionConfig,
    /// Module registry and rollouts.
    pub fleet: FleetConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./hub-data"),
            storage: StorageConfig::default(),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            ingest: IngestConfig::default(),
            retention: RetentionConfig::default(),
            fleet: FleetConfig::default(),
        }
    }
}

/// The module registry and rollouts (`crate::fleet`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Public keys of the publishers whose modules may be uploaded (`ed25519:<hex>`, as
    /// printed by `cloud-hub module keygen`). Empty: every upload is refused.
    pub trusted_keys: Vec<String>,
    /// Largest module accepted on upload.
    pub max_module_bytes: bytesize::ByteSize,
    /// How often rollouts are driven and desired states recomputed (also at once after
    /// an API change or an agent's report).
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// An online agent that reports an older desired-state generation than the stored
    /// one is sent the stored one again after this long.
    #[serde(with = "humantime_serde")]
    pub republish_after: Duration,
    /// Memory for recently downloaded modules: a wave of agents downloading one build
    /// reads it from the database once. 0 disables the cache.
    pub blob_cache: bytesize::ByteSize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            trusted_keys: Vec::new(),
            max_module_bytes: bytesize::ByteSize::mib(16),
            reconcile_interval: Duration::from_secs(2),
            republish_after: Duration::from_secs(30),
            blob_cache: bytesize::ByteSize::mib(64),
        }
    }
}

/// Retention of raw readings, in whole UTC days. One-minute rollups (aggregation), the
/// batch ledger and presence are kept.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Keep raw readings this long (at least one day), e.g. `"90d"`; unset keeps them
    /// forever. Days entirely older than now minus this are deleted (PostgreSQL: their
    /// partitions dropped) by a check every hour and at start.
    #[serde(with = "humantime_serde")]
    pub keep: Option<std::time::Duration>,
}

/// Storage backend selection and settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `sqlite` (one file in `data_dir`, the single-machine default) or `postgres`
    /// (a database shared by any number of hubs).
    pub backend: Backend,
    /// PostgreSQL settings, used when `backend = "postgres"`.
    pub postgres: PostgresConfig,
}

/// A storage backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded SQLite in `data_dir/hub.db`.
    #[default]
    Sqlite,
    /// PostgreSQL at `storage.postgres.url`.
    Postgres,
}

/// Largest accepted `storage.postgres.pool_size`. Every hub instance opens up to this
/// many connections, and PostgreSQL's default `max_connections` is 100.
pub const MAX_POOL_SIZE: usize = 64;

/// PostgreSQL connection settings.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection string, as a URL (`postgres://user:password@host:5432/dbname`) or in
    /// libpq key/value form (`host=db1 port=5432 user=brume dbname=brume`). Several
    /// hosts (`host=a,b`) with `target_session_attrs=read-write` follow a failover.
    /// TLS is not supported yet: use a trusted network or a local proxy.
    pub url: String,
    /// Most connections this hub opens (ingest uses one; the rest serve HTTP queries).
    pub pool_size: usize,
    /// How long to wait for a new connection to be established.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on one store call (an ingest transaction, a query), connecting included.
    /// On expiry the connection is dropped and the server rolls the transaction back;
    /// an ingest is then retried, which dedup makes safe.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Readings of the last this many days (before today, UTC) get a daily partition;
    /// older ones go to the `readings_default` partition. Unset: the retention period
    /// plus one day with `[retention] keep`, else 31 days.
    pub partition_days_back: Option<u32>,
    /// Readings up to this many days after today get a daily partition; later ones (a
    /// clock set wrong) go to `readings_default`. Together with `partition_days_back`
    /// this bounds the number of tables whatever timestamps agents send.
    pub partition_days_ahead: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://brume@localhost:5432/brume".to_owned(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(30),
            partition_days_back: None,
            partition_days_ahead: 3,
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: show only where it points.
        let target = self
            .url
            .parse::<tokio_postgres::Config>()
            .map(|c| crate::store::postgres::describe_target(&c))
            .unwrap_or_else(|_| "<unparsable>".to_owned());
        f.debug_struct("PostgresConfig")
            .field("url", &target)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("query_timeout", &self.query_timeout)
            .finish()
    }
}

impl PostgresConfig {
    /// The store options these settings describe, naming the key at fault if the URL
    /// does not parse. (The parse error is not echoed: it could quote a password.)
    ///
    /// `retention_keep` (`[retention] keep`) sets the default `partition_days_back`.
    pub fn store_options(
        &self,
        retention_keep: Option<Duration>,
    ) -> Result<crate::store::postgres::PostgresOptions, ConfigError> {
        if self.url.trim().is_empty() {
            return Err(invalid("storage.postgres.url", "must not be empty"));
        }
        let mut config: tokio_postgres::Config = self.url.parse().map_err(|_| {
            invalid("storage.postgres.url", "is not a postgres:// URL or a key=value connection string")
        })?;
        if config.get_hosts().is_empty() {
            return Err(invalid("storage.postgres.url", "names no host"));
        }
        config.connect_timeout(self.connect_timeout);
        // Notice a dead server or network path on idle connections within minutes
        // rather than the kernel's default two hours.
        config.keepalives_idle(Duration::from_secs(60));
        if config.get_application_name().is_none() {
            config.application_name("brume-hub");
        }
        const MAX_WINDOW_DAYS: u32 = 3660;
        let back = self.partition_days_back.unwrap_or_else(|| {
            retention_keep.map_or(31, |k| (k.as_secs() / 86_400).min(u64::from(MAX_WINDOW_DAYS)) as u32 + 1)
        });
        if back > MAX_WINDOW_DAYS {
            return Err(invalid("storage.postgres.partition_days_back", format!("{back} is over {MAX_WINDOW_DAYS}")));
        }
        if self.partition_days_ahead > 366 {
            return Err(invalid("storage.postgres.partition_days_ahead", "must be at most 366"));
        }
        Ok(crate::store::postgres::PostgresOptions {
            config,
            pool_size: self.pool_size,
            query_timeout: self.query_timeout,
            partition_window: crate::store::postgres::PartitionWindow {
                days_back: back,
                days_ahead: self.partition_days_ahead,
            },
        })
    }
}

/// MQTT broker connection settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host name or IP address.
    pub host: String,
    /// Broker TCP port.
    pub port: u16,
    /// MQTT client id. Empty means `brume-hub-<random>`, which is what several hubs
    /// sharing one subscription group need (client ids must be unique per broker).
    pub client_id: String,
    /// Shared-subscription group: the hub subscribes to
    /// `$share/<group>/brume/v1/agents/+/batches`, so that several hubs split the load.
    /// Empty means a plain subscription (every hub receives every batch).
    pub share_group: String,
    /// MQTT keep-alive interval. Zero disables keep-alive; otherwise at least 1s.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// The hub's signing key (a file written by `cloud-hub keygen`). With it, every
    /// message to agents (acks, desired states, the online announcement) is signed, and
    /// agents that pin its public key (`forward.hub_keys`) act on nothing else. Every hub
    /// of a fleet uses the same key (or agents pin each hub's). Unset: messages are
    /// unsigned. Upgrade agents before setting it: older agents cannot read signed ones.
    pub signing_key: Option<std::path::PathBuf>,
    /// TLS to the broker (`[mqtt.tls]`: `ca_file`, and `cert_file` + `key_file` for
    /// brokers that identify clients by certificate). Absent: plain TCP.
    pub tls: Option<brume_tls::ClientTls>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".to_owned(),
            port: 1883,
            client_id: String::new(),
            share_group: "brume-hub".to_owned(),
            keep_alive: Duration::from_secs(30),
            signing_key: None,
            tls: None,
        }
    }
}

/// HTTP API settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address the HTTP API listens on. Used by the binary, which binds the listener and
    /// hands it to [`crate::run`].
    pub listen: SocketAddr,
    /// Expensive queries (raw readings, aggregation, quarantine downloads) served at
    /// once; more get 503 with `Retry-After`. Bounds the hub's memory and the database
    /// load that dashboards can cause.
    pub max_concurrent_queries: usize,
    /// API tokens (`[[http.tokens]]`: `name`, `sha256`, `scopes`), written by `cloud-hub
    /// token`. With any, every API route but health, metrics, the dashboard's files and
    /// module downloads needs a token with its scope; without, the API is open.
    pub tokens: Vec<crate::auth::TokenConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8080)), max_concurrent_queries: 8, tokens: Vec::new() }
    }
}

/// Largest accepted `ingest.max_batches_per_tx`. A limit on the group-commit size bounds
/// how long one transaction holds the SQLite write lock and how much memory one group
/// of decoded batches takes (each batch can be up to 8 MiB on the wire).
pub const MAX_BATCHES_PER_TX_LIMIT: usize = 4096;

/// Batch ingestion settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Group commit: at most this many batches that are already waiting are stored in
    /// one transaction (one fsync). 1 disables grouping.
    pub max_batches_per_tx: usize,
    /// How often the per-agent gauges (`brume_hub_agent_missing_batches`,
    /// `brume_hub_agents_online`) are recomputed; each refresh reads every agent.
    #[serde(with = "humantime_serde")]
    pub fleet_metrics_interval: std::time::Duration,
    /// A batch the database refuses, alone, this many times in a row (while it answers
    /// pings and stores other batches) is quarantined: its bytes and the error are kept
    /// for `/api/v1/quarantine`, and it is acknowledged so the agent's outbox moves on.
    pub quarantine_after: u32,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_batches_per_tx: 64,
            fleet_metrics_interval: std::time::Duration::from_secs(30),
            quarantine_after: 3,
        }
    }
}

impl Config {
    /// Parses a configuration from TOML text. Does not validate; call [`Config::validate`].
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Reads and parses a configuration file. Does not validate; call [`Config::validate`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_toml(&text)
    }

    /// Checks values that parse but make no sense, naming the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let m = &self.mqtt;
        if m.host.trim().is_empty() {
            return Err(invalid("mqtt.host", "must not be empty"));
        }
        if m.port == 0 {
            return Err(invalid("mqtt.port", "must be 1 to 65535"));
        }
        crate::auth::Auth::new(&self.http.tokens).map_err(|e| invalid("http.tokens", e))?;
        if let Some(tls) = &m.tls {
            tls.client_config().map_err(|e| invalid("mqtt.tls", e.to_string()))?;
        }
        // MQTT 3.1.1 brokers must accept 23 characters; most accept far more. 256 keeps
        // the id printable in logs and well inside every broker's limit we know of.
        if m.client_id.len() > 256 || m.client_id.chars().any(|c| c.is_control()) {
            return Err(invalid("mqtt.client_id", "at most 256 bytes, no control characters"));
        }
        if m.share_group.chars().any(|c| matches!(c, '/' | '+' | '#') || c.is_control()) {
            return Err(invalid(
                "mqtt.share_group",
                format!("{:?} must not contain '/', '+', '#' or control characters", m.share_group),
            ));
        }
        if !m.keep_alive.is_zero() && m.keep_alive < Duration::from_secs(1) {
            return Err(invalid("mqtt.keep_alive", "must be 0 (disabled) or at least 1s"));
        }
        if m.keep_alive > Duration::from_secs(u16::MAX as u64) {
            return Err(invalid("mqtt.keep_alive", "must be at most 65535s (an MQTT limit)"));
        }
        let p = &self.storage.postgres;
        if self.storage.backend == Backend::Postgres {
            p.store_options(self.retention.keep)?;
        }
        if p.pool_size == 0 || p.pool_size > MAX_POOL_SIZE {
            return Err(invalid(
                "storage.postgres.pool_size",
                format!("{} is out of range 1 to {MAX_POOL_SIZE}", p.pool_size),
            ));
        }
        if p.connect_timeout.is_zero() {
            return Err(invalid("storage.postgres.connect_timeout", "must be positive"));
        }
        if p.query_timeout < Duration::from_secs(1) {
            return Err(invalid("storage.postgres.query_timeout", "must be at least 1s"));
        }
        if !(1..=1024).contains(&self.http.max_concurrent_queries) {
            return Err(invalid(
                "http.max_concurrent_queries",
                format!("{} is out of range 1 to 1024", self.http.max_concurrent_queries),
            ));
        }
        let n = self.ingest.max_batches_per_tx;
        if n == 0 || n > MAX_BATCHES_PER_TX_LIMIT {
            return Err(invalid(
                "ingest.max_batches_per_tx",
                format!("{n} is out of range 1 to {MAX_BATCHES_PER_TX_LIMIT}"),
            ));
        }
        if self.retention.keep.is_some_and(|k| k < std::time::Duration::from_secs(86_400)) {
            return Err(invalid("retention.keep", "must be at least 1 day (retention drops whole days)"));
        }
        if !(1..=100).contains(&self.ingest.quarantine_after) {
            return Err(invalid(
                "ingest.quarantine_after",
                format!("{} is out of range 1 to 100", self.ingest.quarantine_after),
            ));
        }
        if self.ingest.fleet_metrics_interval < std::time::Duration::from_millis(100) {
            return Err(invalid("ingest.fleet_metrics_interval", "must be at least 100ms"));
        }
        let f = &self.fleet;
        brume_signing::Keyring::parse(&f.trusted_keys).map_err(|e| invalid("fleet.trusted_keys", e.to_string()))?;
        // Modules travel over HTTP, not MQTT; the cap bounds what one upload or download
        // holds in memory.
        if f.max_module_bytes.as_u64() == 0 || f.max_module_bytes > bytesize::ByteSize::mib(256) {
            return Err(invalid("fleet.max_module_bytes", "must be 1 B to 256 MiB"));
        }
        if f.reconcile_interval < Duration::from_millis(100) {
            return Err(invalid("fleet.reconcile_interval", "must be at least 100ms"));
        }
        if f.republish_after < f.reconcile_interval {
            return Err(invalid("fleet.republish_after", "must be at least fleet.reconcile_interval"));
        }
        Ok(())
    }

    /// The SQLite database file: `data_dir/hub.db`.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("hub.db")
    }

    /// The MQTT subscription filter for batches, shared or plain.
    pub fn batch_filter(&self) -> String {
        self.shared(brume_protocol::topics::ALL_BATCHES)
    }

    /// The topic filter for agents' presence messages, shared like the batches.
    pub fn status_filter(&self) -> String {
        self.shared(brume_protocol::topics::ALL_STATUS)
    }

    /// The topic filter for agents' module reports, shared like the batches.
    pub fn report_filter(&self) -> String {
        self.shared(brume_protocol::topics::ALL_REPORTS)
    }

    fn shared(&self, filter: &str) -> String {
        if self.mqtt.share_group.is_empty() {
            filter.to_owned()
        } else {
            format!("$share/{}/{}", self.mqtt.share_group, filter)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_loads_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let cfg = Config::load(&path).unwrap();
        cfg.validate().unwrap();
        // The example documents the defaults, so the two must agree.
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn empty_config_is_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_error_names_the_key() {
        let err = Config::from_toml("[mqtt]\nhots = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("hots"), "{err}");
        let err = Config::from_toml("datadir = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("datadir"), "{err}");
    }

    #[test]
    fn durations_are_humantime() {
        let cfg = Config::from_toml("[mqtt]\nkeep_alive = \"1m 5s\"\n").unwrap();
        assert_eq!(cfg.mqtt.keep_alive, Duration::from_secs(65));
        let err = Config::from_toml("[mqtt]\nkeep_alive = 30\n").unwrap_err().to_string();
        assert!(err.contains("keep_alive"), "{err}");
    }

    #[test]
    fn validate_names_the_key() {
        let check = |toml: &str, key: &str| {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{toml:?}: {err}");
        };
        check("[mqtt]\nport = 0", "mqtt.port");
        check("[mqtt]\nhost = \"\"", "mqtt.host");
        check("[mqtt]\nshare_group = \"a/b\"", "mqtt.share_group");
        check("[mqtt]\nkeep_alive = \"500ms\"", "mqtt.keep_alive");
        check("[ingest]\nmax_batches_per_tx = 0", "ingest.max_batches_per_tx");
        check("data_dir = \"\"", "data_dir");
        check("[retention]\nkeep = \"12h\"", "retention.keep");
        check("[ingest]\nfleet_metrics_interval = \"1ms\"", "ingest.fleet_metrics_interval");
        let pg = "[storage]\nbackend = \"postgres\"\n[storage.postgres]\n";
        check(&format!("{pg}url = \"\""), "storage.postgres.url");
        check(&format!("{pg}url = \"http://x\""), "storage.postgres.url");
        check(&format!("{pg}url = \"port=5\""), "storage.postgres.url");
        check(&format!("{pg}pool_size = 0"), "storage.postgres.pool_size");
        check(&format!("{pg}pool_size = 1000"), "storage.postgres.pool_size");
        check(&format!("{pg}connect_timeout = \"0s\""), "storage.postgres.connect_timeout");
        check(&format!("{pg}query_timeout = \"10ms\""), "storage.postgres.query_timeout");
    }

    #[test]
    fn storage_backend_and_postgres_settings() {
        assert_eq!(Config::default().storage.backend, Backend::Sqlite);
        let cfg = Config::from_toml(
            "[storage]\nbackend = \"postgres\"\n[storage.postgres]\n\
             url = \"host=db1,db2 user=brume password=s3cret dbname=telemetry target_session_attrs=read-write\"\n\
             pool_size = 3\nquery_timeout = \"1m\"\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.storage.backend, Backend::Postgres);
        let opts = cfg.storage.postgres.store_options(None).unwrap();
        assert_eq!(opts.pool_size, 3);
        assert_eq!(opts.query_timeout, Duration::from_secs(60));
        assert_eq!(opts.config.get_dbname(), Some("telemetry"));
        assert_eq!(opts.config.get_hosts().len(), 2);
        // Debug output never shows the password.
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("db1:5432/telemetry"), "{shown}");
        let err = Config::from_toml("[storage]\nbackend = \"mysql\"\n").unwrap_err().to_string();
        assert!(err.contains("backend"), "{err}");
        // A bad URL with a password: the error names the key, not the password.
        let err = Config::from_toml(
            "[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = \"postgres://u:s3cret@h:notaport/db\"\n",
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("`storage.postgres.url`") && !err.contains("s3cret"), "{err}");
    }

    #[test]
    fn postgres_doc_sample_config_is_valid() {
        // POSTGRES.md's sample must stay loadable: extract its ```toml block.
        let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("POSTGRES.md")).unwrap();
        let start = doc.find("```toml\n").expect("a ```toml block") + 8;
        let len = doc[start..].find("```").unwrap();
        let cfg = Config::from_toml(&doc[start..start + len]).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.storage.backend, Backend::Postgres);
        assert!(!cfg.mqtt.share_group.is_empty());
    }

    #[test]
    fn batch_filter_shared_or_plain() {
        let mut cfg = Config::default();
        assert_eq!(cfg.batch_filter(), "$share/brume-hub/brume/v1/agents/+/batches");
        cfg.mqtt.share_group.clear();
        assert_eq!(cfg.batch_filter(), "brume/v1/agents/+/batches");
    }
}
