//! The agent's TOML configuration: typed, with defaults for every key, unknown keys
//! rejected, and [`Config::validate`] reporting errors that name the offending key.
//!
//! `edge-agent/config.example.toml` documents every key; a unit test loads it so it
//! cannot drift from this file.

pub use brume_protocol::topics::pattern_matches;
use brume_protocol::topics::validate_pattern;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::ingest::payload::PayloadConfig;

/// A configuration error, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown key or a wrongly typed value.
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("invalid config key `{key}`: {why}")]
    Invalid {
        /// Dotted key path, e.g. `forward.batch_max_readings`.
        key: String,
        /// What is wrong and what would be valid.
        why: String,
    },
}

fn invalid(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), why: why.into() }
}

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This agent's id: its identity at the hub and its MQTT topic level.
    /// Letters, digits, `_`, `.` and `-`.
    pub agent_id: String,
    /// Labels sent to the hub with the agent's presence (`site = "plant-a"`), to filter
    /// the fleet there (`/api/v1/presence?label=site:plant-a`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Directory holding the SQLite store (`agent.db`). Created if missing.
    pub data_dir: PathBuf,
    /// The local store: durability, retention, limits.
    pub store: StoreConfig,
    /// How readings leave the agent.
    pub forward: ForwardConfig,
    /// The built-in MQTT listener sensors publish to.
    pub listener: ListenerConfig,
    /// Consuming from an existing local MQTT broker.
    pub subscribe: SubscribeConfig,
    /// Local HTTP server: ingest, health, metrics, status.
    pub http: HttpConfig,
    /// Simulated sensors, for the demo and benchmarks.
    pub simulator: SimulatorConfig,
    /// How payloads and their timestamps are parsed.
    pub payload: PayloadConfig,
    /// How WASM processing modules run.
    pub module_runtime: ModuleRuntimeConfig,
    /// WASM processing modules (`[[modules]]` entries).
    pub modules: Vec<ModuleConfig>,
    /// Modules from the hub's deployments.
    pub fleet: FleetConfig,
}

/// Taking modules from the hub's deployments (`crate::fleet`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Base URL of a hub's HTTP API, where modules are downloaded from (e.g.
    /// `http://hub.example:8080`). Empty (the default): the agent runs only the modules
    /// of its own config. Needs `forward.mode = "hub"`: desired states arrive over the
    /// forwarding MQTT connection.
    pub hub_url: String,
    /// Publishers' public keys (`ed25519:<hex>`) whose signatures this agent accepts.
    /// A module is verified against these before it is stored and again before it is
    /// loaded, whatever the hub says.
    pub trusted_keys: Vec<String>,
    /// Largest module the agent downloads.
    pub max_module_bytes: ByteSize,
    /// Time limit of one download attempt.
    #[serde(with = "humantime_serde")]
    pub download_timeout: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            hub_url: String::new(),
            trusted_keys: Vec::new(),
            max_module_bytes: ByteSize::mib(16),
            download_timeout: Duration::from_secs(300),
        }
    }
}

impl FleetConfig {
    /// True when the agent takes modules from deployments.
    pub fn enabled(&self) -> bool {
        !self.hub_url.is_empty()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            agent_id: "edge-01".into(),
            labels: Default::default(),
            data_dir: PathBuf::from("./agent-data"),
            store: StoreConfig::default(),
            forward: ForwardConfig::default(),
            listener: ListenerConfig::default(),
            subscribe: SubscribeConfig::default(),
            http: HttpConfig::default(),
            simulator: SimulatorConfig::default(),
            payload: PayloadConfig::default(),
            module_runtime: ModuleRuntimeConfig::default(),
            modules: Vec::new(),
            fleet: FleetConfig::default(),
        }
    }
}

/// How WASM processing modules run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModuleRuntimeConfig {
    /// Most input readings handed to a module in one call.
    pub batch_max_readings: usize,
    /// How often a module's file is checked for changes (hot reload). New input needs no
    /// polling: modules are woken by the store's commits.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Threads that run the modules, which are spread over them in config order (module
    /// `i` on thread `i % threads`). One thread runs its modules in turn, a batch each;
    /// every thread has its own read connection, heap arena and stack, so each one costs
    /// memory. Raise it when modules together need more than one core.
    pub threads: usize,
}

impl Default for ModuleRuntimeConfig {
    fn default() -> Self {
        ModuleRuntimeConfig { batch_max_readings: 1000, poll_interval: Duration::from_millis(500), threads: 1 }
    }
}

/// What to do with a batch a module failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Skip the batch (its readings stay in the store) and go on with the next.
    Skip,
    /// Retry the same batch after a backoff.
    Retry,
}

/// Where a newly deployed module starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// With readings accepted after the agent started (agent start, not module load, so
    /// nothing is missed while the module compiles).
    Latest,
    /// With the oldest reading still in the local store (re-processing history).
    Earliest,
}

/// One WASM processing module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    /// Name (defaults to the manifest's name). Progress and state are kept under it.
    #[serde(default)]
    pub name: Option<String>,
    /// The `.wasm` file. Reloaded when it changes.
    pub path: PathBuf,
    /// The module's config block, handed to its `init` as JSON.
    #[serde(default)]
    pub config: Option<toml::Table>,
    /// Input stream patterns (MQTT-style `+`/`#`), replacing the manifest's `inputs`: binds
    /// a module to this device's stream names without rebuilding it.
    #[serde(default)]
    pub inputs: Option<Vec<String>>,
    /// Failed batch: `skip` (default) or `retry`.
    #[serde(default = "default_on_failure")]
    pub on_failure: OnFailure,
    /// After this many consecutive failed batches the module is disabled until its file
    /// changes.
    #[serde(default = "default_max_failures")]
    pub max_consecutive_failures: u32,
    /// Where a module with no saved progress starts: `latest` (default) or `earliest`.
    #[serde(default = "default_start_at")]
    pub start_at: StartAt,
    /// Overrides the manifest's linear-memory cap.
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// Overrides the manifest's fuel per batch.
    #[serde(default)]
    pub fuel_per_batch: Option<u64>,
    /// Wall-clock budget per batch.
    #[serde(default, with = "humantime_serde")]
    pub time_per_batch: Option<Duration>,
    /// Overrides the manifest's cap on output readings per batch.
    #[serde(default)]
    pub max_output_readings: Option<u32>,
}

fn default_on_failure() -> OnFailure {
    OnFailure::Skip
}
fn default_max_failures() -> u32 {
    5
}
fn default_start_at() -> StartAt {
    StartAt::Latest
}

/// How commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// fsync the write-ahead log on every commit, before any acknowledgement: survives
    /// power loss. The default.
    Full,
    /// Commit without fsync (SQLite `synchronous=NORMAL`): survives a crash of the agent
    /// process, but a power loss may lose the last commits that were already acknowledged.
    Fast,
}

/// What a stream does when it reaches its byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the stream's oldest readings to make room; each one not yet acknowledged by
    /// the hub is counted as lost and reported.
    DropOldest,
    /// Refuse new readings of the stream (MQTT: no PUBACK / PUBACK "quota exceeded";
    /// HTTP: 507), so sensors keep them until there is room.
    RefuseNew,
}

/// The local SQLite store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `full` (default, fsync before acknowledging) or `fast`.
    pub durability: Durability,
    /// Budget for all readings together, e.g. `"1 GiB"`. When reached, streams with
    /// `when_full = "drop_oldest"` lose their oldest readings first and streams with
    /// `refuse_new` refuse new ones.
    pub max_bytes: ByteSize,
    /// Most distinct streams; readings for further new streams are refused. Protects
    /// the agent against a flood of new topics.
    pub max_streams: usize,
    /// Most readings committed in one transaction (group commit bound).
    pub max_readings_per_commit: usize,
    /// How long the writer gathers readings after the first before committing them
    /// (default 50 ms; 0: commit whatever is queued at once). Each commit writes a few pages of flash
    /// whatever it holds, so a longer window means less wear and acknowledgements (PUBACK,
    /// HTTP 204) later by up to this much. The window closes early for MQTT sensors seen
    /// waiting for their acknowledgements (in-flight limit reached) and for modules that
    /// are behind, so those are not capped at one window's worth (see `store::window`).
    #[serde(with = "humantime_serde")]
    pub commit_window: Duration,
    /// How often age-based retention runs.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// SQLite page size of a new store (512 B to 64 KiB, a power of two; an existing
    /// store keeps its own). Every commit rewrites the last, partly filled page of
    /// readings, so at sensor rates small pages mean less flash wear: 1 KiB (default)
    /// writes about 40 % fewer bytes per reading than 4 KiB at 100 to 10,000 readings/s;
    /// 4 KiB ingests bulk about 25 % faster (BENCHMARKS.md, issue 16).
    pub page_size: ByteSize,
    /// Per-stream rules; the first whose `match` fits the stream applies. Streams that match
    /// none get `default_rule`.
    pub streams: Vec<StreamRule>,
    /// Rule for streams no entry in `streams` matches.
    pub default_rule: StreamRuleBody,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::Full,
            max_bytes: ByteSize::gib(1),
            max_streams: 10_000,
            max_readings_per_commit: 20_000,
            commit_window: Duration::from_millis(50),
            retention_interval: Duration::from_secs(60),
            page_size: ByteSize::kib(1),
            streams: Vec::new(),
            default_rule: StreamRuleBody::default(),
        }
    }
}

/// Retention and overflow policy for the streams a pattern matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRule {
    /// MQTT-style pattern: `sensors/+/temp`, `line1/#`, or an exact name.
    #[serde(rename = "match")]
    pub pattern: String,
    /// The rule.
    #[serde(flatten)]
    pub rule: StreamRuleBody,
}

/// Retention and overflow policy of one stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamRuleBody {
    /// Readings older than this (by reading timestamp) are deleted.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Byte budget of the stream.
    pub max_bytes: ByteSize,
    /// What happens when the stream (or the whole store) is full.
    pub when_full: WhenFull,
    /// Whether the stream is forwarded. `false` keeps it as local history only (for
    /// example raw sensor streams whose processed results are what leaves the device).
    pub forward: bool,
}

impl Default for StreamRuleBody {
    fn default() -> Self {
        StreamRuleBody {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: ByteSize::mib(256),
            when_full: WhenFull::DropOldest,
            forward: true,
        }
    }
}

/// Where forwarded data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardMode {
    /// Postcard batches to a Brume hub, deleted from the outbox only on the hub's ack.
    Hub,
    /// JSON for plain MQTT consumers; the broker's PUBACK is the acknowledgement.
    Json,
    /// Store locally only.
    Off,
}

/// JSON output granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonGranularity {
    /// One JSON object per reading.
    Reading,
    /// One JSON array per batch.
    Batch,
}

/// Forwarding over MQTT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// `hub` (default), `json` or `off`.
    pub mode: ForwardMode,
    /// The cloud broker's host.
    pub host: String,
    /// The cloud broker's port.
    pub port: u16,
    /// MQTT client id; empty means `brume-agent-<agent_id>`.
    pub client_id: String,
    /// MQTT keepalive.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Most readings in one batch.
    pub batch_max_readings: usize,
    /// Most bytes (approximately) in one batch.
    pub batch_max_bytes: ByteSize,
    /// How long a reading may wait for its batch to fill before the batch is cut anyway.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Batches sent and not yet acknowledged by the hub, at most.
    pub window: usize,
    /// A batch not acknowledged within this time is sent again.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Hub mode: how often the agent publishes its presence (retained, on
    /// `brume/v1/agents/<id>/status`); the hub considers it gone after three missed.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// JSON mode: topic to publish to; `{agent}` is replaced by the agent id and `{stream}`
    /// (per-reading granularity only) by the stream name.
    pub json_topic: String,
    /// JSON mode: one message per `reading` or per `batch`.
    pub json_granularity: JsonGranularity,
    /// Hub mode: the public keys of the hubs' signing keys (`ed25519:<hex>`, printed by
    /// `cloud-hub keygen`; several during a rotation). When set, the agent acts only on hub
    /// messages (acknowledgements, desired states, the online announcement) signed by one
    /// of them for the topic they arrived on; anything else is dropped and counted
    /// (`hub_messages_rejected`), so no other broker client can make it delete batches
    /// from its outbox. Empty: hub messages are not authenticated (a warning at start).
    pub hub_keys: Vec<String>,
    /// TLS to the cloud broker (`[forward.tls]`: `ca_file`, and `cert_file` + `key_file`
    /// for brokers that identify agents by client certificate). Absent: plain TCP.
    pub tls: Option<brume_tls::ClientTls>,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            mode: ForwardMode::Hub,
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: String::new(),
            keep_alive: Duration::from_secs(30),
            batch_max_readings: 1000,
            batch_max_bytes: ByteSize::kib(512),
            batch_linger: Duration::from_millis(200),
            window: 16,
            ack_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            heartbeat: Duration::from_secs(10),
            json_topic: "brume/json/{agent}".into(),
            json_granularity: JsonGranularity::Reading,
            hub_keys: Vec::new(),
            tls: None,
        }
    }
}

/// The built-in MQTT listener (MQTT 3.1.1 and 5) for sensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Whether the listener runs.
    pub enabled: bool,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest MQTT packet accepted; larger ones close the connection (MQTT 5: with
    /// reason "packet too large").
    pub max_packet_bytes: ByteSize,
    /// Most concurrent sensor connections.
    pub max_connections: usize,
    /// QoS 1 PUBLISHes of one connection awaiting their commit, at most (MQTT 5 receive
    /// maximum); reading stops beyond it, which pushes back on the sensor.
    pub max_inflight: u16,
    /// Prefix removed from topics to form stream names (`sensors/` makes `sensors/a/t` the
    /// stream `a/t`).
    pub strip_prefix: String,
    /// A connection silent for 1.5 × its keepalive is closed; this is the keepalive used when
    /// a client asks for none.
    #[serde(with = "humantime_serde")]
    pub default_keep_alive: Duration,
    /// A persistent session (MQTT 3.1.1 `CleanSession = 0`, MQTT 5 `Clean Start = 0` with a
    /// session expiry) is kept this long after its client disconnects: the packet
    /// identifiers of its committed PUBLISHes, so a re-send after a crash is not stored
    /// twice. MQTT 5 clients asking for less get what they ask.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    /// New streams one client id may create at once; beyond it the sensor is refused
    /// (MQTT 5: PUBACK 0x97; 3.1.1: the connection closes) until its budget refills. Keeps
    /// one misbehaving sensor from taking every stream of `store.max_streams`.
    pub new_streams_burst: u32,
    /// New streams per minute a client's budget regains (0: none).
    pub new_streams_per_minute: u32,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            enabled: true,
            listen: "127.0.0.1:1884".parse().expect("valid address"),
            max_packet_bytes: ByteSize::kib(256),
            max_connections: 1000,
            max_inflight: 100,
            strip_prefix: String::new(),
            default_keep_alive: Duration::from_secs(300),
            session_expiry: Duration::from_secs(7 * 86_400),
            new_streams_burst: 1000,
            new_streams_per_minute: 100,
        }
    }
}

/// Subscribe mode: consume from an existing local broker with a persistent QoS 1 session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscribeConfig {
    /// Whether subscribe mode runs.
    pub enabled: bool,
    /// Local broker host.
    pub host: String,
    /// Local broker port.
    pub port: u16,
    /// MQTT client id (the persistent session's name); empty means `brume-ingest-<agent_id>`.
    pub client_id: String,
    /// Topic filters to subscribe to at QoS 1.
    pub topics: Vec<String>,
    /// Prefix removed from topics to form stream names.
    pub strip_prefix: String,
    /// TLS to the local broker (`[subscribe.tls]`, as `[forward.tls]`). Absent: plain TCP.
    pub tls: Option<brume_tls::ClientTls>,
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        SubscribeConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: String::new(),
            topics: vec!["sensors/#".into()],
            strip_prefix: String::new(),
            tls: None,
        }
    }
}

/// Local HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Whether it runs.
    pub enabled: bool,
    /// Address to listen on.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { enabled: true, listen: "127.0.0.1:8181".parse().expect("valid address") }
    }
}

/// Simulated sensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorConfig {
    /// Whether the simulator runs.
    pub enabled: bool,
    /// Number of simulated streams, named `sim/<n>`.
    pub streams: usize,
    /// Readings per second, all streams together.
    pub rate: f64,
    /// Readings handed to the store per write (batched ingest).
    pub batch: usize,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig { enabled: false, streams: 4, rate: 20.0, batch: 100 }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        brume_protocol::validate_agent_id(&self.agent_id).map_err(|e| invalid("agent_id", e.to_string()))?;
        let max_labels = brume_protocol::MAX_STATUS_MODULES - crate::platform_labels().len();
        if self.labels.len() > max_labels {
            return Err(invalid("labels", format!("at most {max_labels} labels")));
        }
        for (k, v) in &self.labels {
            if k.starts_with(crate::PLATFORM_LABEL_PREFIX) {
                return Err(invalid(
                    format!("labels.{k}"),
                    format!(
                        "keys starting with {:?} are set by the agent itself (architecture, build)",
                        crate::PLATFORM_LABEL_PREFIX
                    ),
                ));
            }
            if k.is_empty()
                || k.contains(':')
                || k.len() > 64
                || v.len() > 128
                || (k.clone() + v).chars().any(char::is_control)
            {
                return Err(invalid(
                    format!("labels.{k}"),
                    "keys are 1 to 64 bytes without ':', values at most 128 bytes, no control characters",
                ));
            }
        }
        if self.store.max_streams == 0 {
            return Err(invalid("store.max_streams", "must be at least 1"));
        }
        if self.store.max_readings_per_commit == 0 {
            return Err(invalid("store.max_readings_per_commit", "must be at least 1"));
        }
        if self.store.retention_interval.is_zero() {
            return Err(invalid("store.retention_interval", "must be positive"));
        }
        let ps = self.store.page_size.as_u64();
        if !(512..=65_536).contains(&ps) || !ps.is_power_of_two() {
            return Err(invalid(
                "store.page_size",
                "must be a power of two from 512 B to 64 KiB, e.g. \"1 KiB\" or \"4 KiB\"",
            ));
        }
        for (i, s) in self.store.streams.iter().enumerate() {
            validate_pattern(&s.pattern).map_err(|why| invalid(format!("store.streams[{i}].match"), why))?;
        }
        let f = &self.forward;
        if f.batch_max_readings == 0 {
            return Err(invalid("forward.batch_max_readings", "must be at least 1"));
        }
        if f.batch_max_bytes.as_u64() as usize > brume_protocol::limits::MAX_MESSAGE_BYTES / 2 {
            return Err(invalid(
                "forward.batch_max_bytes",
                format!("must be at most {} bytes", brume_protocol::limits::MAX_MESSAGE_BYTES / 2),
            ));
        }
        if f.window == 0 {
            return Err(invalid("forward.window", "must be at least 1"));
        }
        if f.heartbeat < Duration::from_secs(1) || f.heartbeat > Duration::from_secs(3600) {
            return Err(invalid("forward.heartbeat", "must be between 1s and 1h"));
        }
        if f.ack_timeout.is_zero() {
            return Err(invalid("forward.ack_timeout", "must be positive"));
        }
        if f.reconnect_min.is_zero() || f.reconnect_min > f.reconnect_max {
            return Err(invalid("forward.reconnect_min", "must be positive and at most forward.reconnect_max"));
        }
        if f.keep_alive < Duration::from_secs(1) {
            return Err(invalid("forward.keep_alive", "must be at least 1s"));
        }
        if f.mode == ForwardMode::Json && f.json_topic.is_empty() {
            return Err(invalid("forward.json_topic", "must not be empty in json mode"));
        }
        if self.listener.max_inflight == 0 {
            return Err(invalid("listener.max_inflight", "must be at least 1"));
        }
        brume_signing::Keyring::parse(&f.hub_keys).map_err(|e| invalid("forward.hub_keys", e.to_string()))?;
        if let Some(tls) = &f.tls {
            tls.client_config().map_err(|e| invalid("forward.tls", e.to_string()))?;
        }
        if let Some(tls) = &self.subscribe.tls {
            tls.client_config().map_err(|e| invalid("subscribe.tls", e.to_string()))?;
        }
        if !f.hub_keys.is_empty() && f.mode != ForwardMode::Hub {
            return Err(invalid(
                "forward.hub_keys",
                "only hub mode has hub messages to verify (forward.mode = \"hub\")",
            ));
        }
        let fl = &self.fleet;
        if fl.enabled() {
            if !(fl.hub_url.starts_with("http://") || fl.hub_url.starts_with("https://"))
                || reqwest::Url::parse(&fl.hub_url).is_err()
            {
                return Err(invalid("fleet.hub_url", format!("{:?} is not an http:// or https:// URL", fl.hub_url)));
            }
            if f.mode != ForwardMode::Hub {
                return Err(invalid(
                    "fleet.hub_url",
                    "needs forward.mode = \"hub\" (desired states come from the hub)",
                ));
            }
            if fl.trusted_keys.is_empty() {
                return Err(invalid(
                    "fleet.trusted_keys",
                    "give at least one publisher key (ed25519:...): modules are verified against them",
                ));
            }
        }
        brume_signing::Keyring::parse(&fl.trusted_keys).map_err(|e| invalid("fleet.trusted_keys", e.to_string()))?;
        if fl.max_module_bytes.as_u64() == 0 || fl.max_module_bytes > ByteSize::mib(256) {
            return Err(invalid("fleet.max_module_bytes", "must be 1 B to 256 MiB"));
        }
        if fl.download_timeout < Duration::from_secs(1) {
            return Err(invalid("fleet.download_timeout", "must be at least 1s"));
        }
        if self.listener.max_connections == 0 {
            return Err(invalid("listener.max_connections", "must be at least 1"));
        }
        if self.subscribe.enabled && self.subscribe.topics.is_empty() {
            return Err(invalid("subscribe.topics", "needs at least one topic filter when subscribe.enabled"));
        }
        for (i, t) in self.subscribe.topics.iter().enumerate() {
            validate_pattern(t).map_err(|why| invalid(format!("subscribe.topics[{i}]"), why))?;
        }
        if self.module_runtime.batch_max_readings == 0 {
            return Err(invalid("module_runtime.batch_max_readings", "must be at least 1"));
        }
        if self.module_runtime.threads == 0 {
            return Err(invalid("module_runtime.threads", "must be at least 1"));
        }
        if self.module_runtime.poll_interval.is_zero() {
            return Err(invalid("module_runtime.poll_interval", "must be positive"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.modules.iter().enumerate() {
            if m.path.as_os_str().is_empty() {
                return Err(invalid(format!("modules[{i}].path"), "must name a .wasm file"));
            }
            if let Some(n) = &m.name
                && !names.insert(n.clone())
            {
                return Err(invalid(format!("modules[{i}].name"), format!("{n:?} is used twice")));
            }
            if m.name.as_deref().is_some_and(|n| n.starts_with('#')) {
                return Err(invalid(format!("modules[{i}].name"), "names starting with '#' are reserved"));
            }
            for (j, p) in m.inputs.iter().flatten().enumerate() {
                validate_pattern(p).map_err(|why| invalid(format!("modules[{i}].inputs[{j}]"), why))?;
            }
            if m.inputs.as_ref().is_some_and(|v| v.is_empty()) {
                return Err(invalid(format!("modules[{i}].inputs"), "is empty: omit it to use the manifest's inputs"));
            }
            if m.max_consecutive_failures == 0 {
                return Err(invalid(format!("modules[{i}].max_consecutive_failures"), "must be at least 1"));
            }
            if m.time_per_batch.is_some_and(|t| t.is_zero()) || m.fuel_per_batch == Some(0) {
                return Err(invalid(format!("modules[{i}]"), "time_per_batch and fuel_per_batch must be positive"));
            }
        }
        if self.simulator.enabled
            && (self.simulator.streams == 0
                || self.simulator.rate.is_nan()
                || self.simulator.rate <= 0.0
                || self.simulator.batch == 0)
        {
            return Err(invalid("simulator", "streams, rate and batch must be positive when enabled"));
        }
        Ok(())
    }

    /// The rule for a stream.
    pub fn rule_for(&self, stream: &str) -> &StreamRuleBody {
        rule_for(&self.store.streams, &self.store.default_rule, stream)
    }
}

/// The per-stream retention rules on their own (`store.streams` and
/// `store.default_rule`), for the store, which needs nothing else of the config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamRules {
    /// The rules in config order; the first whose pattern matches applies.
    pub rules: Vec<StreamRule>,
    /// The rule of streams no pattern matches.
    pub default: StreamRuleBody,
}

impl StreamRules {
    /// The rules of `cfg`.
    pub fn from_config(cfg: &Config) -> StreamRules {
        StreamRules { rules: cfg.store.streams.clone(), default: cfg.store.default_rule.clone() }
    }

    /// The rule for a stream.
    pub fn rule_for(&self, stream: &str) -> &StreamRuleBody {
        rule_for(&self.rules, &self.default, stream)
    }
}

/// The rule of a stream; a re-processed variant (`stream#<build>`) follows its stream's.
fn rule_for<'a>(rules: &'a [StreamRule], default: &'a StreamRuleBody, stream: &str) -> &'a StreamRuleBody {
    let stream = brume_protocol::split_variant(stream).0;
    rules.iter().find(|r| pattern_matches(&r.pattern, stream)).map(|r| &r.rule).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_loads_and_matches_defaults_where_it_says_so() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let cfg = Config::load(&path).expect("config.example.toml must load");
        assert_eq!(cfg.store.durability, Durability::Full);
        assert!(!cfg.store.streams.is_empty(), "the example shows a per-stream rule");
    }

    #[test]
    fn empty_config_is_all_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("agent_idd = \"x\"").contains("agent_idd"));
        assert!(err("[forward]\nwindoww = 3").contains("windoww"));
        assert!(err("agent_id = \"a/b\"").contains("`agent_id`"));
        assert!(err("[forward]\nwindow = 0").contains("`forward.window`"));
        assert!(err("[forward]\nack_timeout = \"soon\"").contains("ack_timeout"));
        assert!(err("[[store.streams]]\nmatch = \"a/#/b\"").contains("`store.streams[0].match`"));
        assert!(err("[store]\nmax_bytes = \"lots\"").contains("max_bytes"));
        assert!(err("[store.default_rule]\nwhen_full = \"panic\"").contains("when_full"));
        assert!(err("[[modules]]\npath = \"m.wasm\"\ninputs = [\"a/#/b\"]").contains("`modules[0].inputs[0]`"));
        assert!(err("[[modules]]\npath = \"m.wasm\"\ninputs = []").contains("`modules[0].inputs`"));
        assert!(err("[labels]\n\"a:b\" = \"x\"").contains("`labels.a:b`"));
        assert!(err("[store]\npage_size = \"1000 B\"").contains("`store.page_size`"));
        assert!(err("[store]\npage_size = \"128 KiB\"").contains("`store.page_size`"));
        assert!(err("[fleet]\nhub_url = \"hub:8080\"").contains("`fleet.hub_url`"));
        assert!(err("[fleet]\nhub_url = \"http://hub:8080\"").contains("`fleet.trusted_keys`"));
        assert!(err("[forward]\nhub_keys = [\"ed25519:00\"]").contains("`forward.hub_keys`"));
        assert!(err("[forward]\nmode = \"json\"\nhub_keys = [\"ed25519:3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29\"]").contains("`forward.hub_keys`"));
        assert!(err("[fleet]\ntrusted_keys = [\"ed25519:00\"]").contains("`fleet.trusted_keys`"));
        assert!(
            err("[forward]\nmode = \"json\"\n[fleet]\nhub_url = \"http://h:1\"\ntrusted_keys = [\"x\"]")
                .contains("`fleet.hub_url`")
        );
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("#", "a/b"));
        assert!(pattern_matches("a/#", "a"));
        assert!(pattern_matches("a/#", "a/b/c"));
        assert!(pattern_matches("a/+/c", "a/b/c"));
        assert!(!pattern_matches("a/+/c", "a/b/d"));
        assert!(!pattern_matches("a/b", "a/b/c"));
        assert!(pattern_matches("a/b", "a/b"));
    }

    #[test]
    fn first_matching_rule_wins() {
        let cfg = Config::parse(
            "[[store.streams]]\nmatch = \"crit/#\"\nwhen_full = \"refuse_new\"\n\
             [[store.streams]]\nmatch = \"#\"\nmax_bytes = \"1 MiB\"\n",
        )
        .unwrap();
        assert_eq!(cfg.rule_for("crit/x").when_full, WhenFull::RefuseNew);
        assert_eq!(cfg.rule_for("other").max_bytes, ByteSize::mib(1));
    }
}
