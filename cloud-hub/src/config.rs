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
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The whole hub configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory holding the hub's SQLite database (`hub.db`). Created if missing.
    pub data_dir: PathBuf,
    /// MQTT broker connection.
    pub mqtt: MqttConfig,
    /// HTTP API.
    pub http: HttpConfig,
    /// Batch ingestion.
    pub ingest: IngestConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./hub-data"),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            ingest: IngestConfig::default(),
        }
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
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".to_owned(),
            port: 1883,
            client_id: String::new(),
            share_group: "brume-hub".to_owned(),
            keep_alive: Duration::from_secs(30),
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
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
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
    /// one SQLite transaction (one fsync). 1 disables grouping.
    pub max_batches_per_tx: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_batches_per_tx: 64,
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
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
        // MQTT 3.1.1 brokers must accept 23 characters; most accept far more. 256 keeps
        // the id printable in logs and well inside every broker's limit we know of.
        if m.client_id.len() > 256 || m.client_id.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "mqtt.client_id",
                "at most 256 bytes, no control characters",
            ));
        }
        if m.share_group
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
        {
            return Err(invalid(
                "mqtt.share_group",
                format!(
                    "{:?} must not contain '/', '+', '#' or control characters",
                    m.share_group
                ),
            ));
        }
        if !m.keep_alive.is_zero() && m.keep_alive < Duration::from_secs(1) {
            return Err(invalid(
                "mqtt.keep_alive",
                "must be 0 (disabled) or at least 1s",
            ));
        }
        if m.keep_alive > Duration::from_secs(u16::MAX as u64) {
            return Err(invalid(
                "mqtt.keep_alive",
                "must be at most 65535s (an MQTT limit)",
            ));
        }
        let n = self.ingest.max_batches_per_tx;
        if n == 0 || n > MAX_BATCHES_PER_TX_LIMIT {
            return Err(invalid(
                "ingest.max_batches_per_tx",
                format!("{n} is out of range 1 to {MAX_BATCHES_PER_TX_LIMIT}"),
            ));
        }
        Ok(())
    }

    /// The SQLite database file: `data_dir/hub.db`.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("hub.db")
    }

    /// The MQTT subscription filter for batches, shared or plain.
    pub fn batch_filter(&self) -> String {
        if self.mqtt.share_group.is_empty() {
            brume_protocol::topics::ALL_BATCHES.to_owned()
        } else {
            format!(
                "$share/{}/{}",
                self.mqtt.share_group,
                brume_protocol::topics::ALL_BATCHES
            )
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
        let err = Config::from_toml("[mqtt]\nhots = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hots"), "{err}");
        let err = Config::from_toml("datadir = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("datadir"), "{err}");
    }

    #[test]
    fn durations_are_humantime() {
        let cfg = Config::from_toml("[mqtt]\nkeep_alive = \"1m 5s\"\n").unwrap();
        assert_eq!(cfg.mqtt.keep_alive, Duration::from_secs(65));
        let err = Config::from_toml("[mqtt]\nkeep_alive = 30\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep_alive"), "{err}");
    }

    #[test]
    fn validate_names_the_key() {
        let check = |toml: &str, key: &str| {
            let err = Config::from_toml(toml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{toml:?}: {err}");
        };
        check("[mqtt]\nport = 0", "mqtt.port");
        check("[mqtt]\nhost = \"\"", "mqtt.host");
        check("[mqtt]\nshare_group = \"a/b\"", "mqtt.share_group");
        check("[mqtt]\nkeep_alive = \"500ms\"", "mqtt.keep_alive");
        check(
            "[ingest]\nmax_batches_per_tx = 0",
            "ingest.max_batches_per_tx",
        );
        check("data_dir = \"\"", "data_dir");
    }

    #[test]
    fn batch_filter_shared_or_plain() {
        let mut cfg = Config::default();
        assert_eq!(
            cfg.batch_filter(),
            "$share/brume-hub/brume/v1/agents/+/batches"
        );
        cfg.mqtt.share_group.clear();
        assert_eq!(cfg.batch_filter(), "brume/v1/agents/+/batches");
    }
}
