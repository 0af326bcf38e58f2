//! Threshold filter: forwards readings whose numeric `field` (default `value`) is above
//! `limit` to `alerts/threshold`, with the input stream as a `source` field.
//!
//! Config: `{"limit": 80.0, "field": "value"}` (`limit` is required). Readings without the
//! field, or with a non-numeric one, are dropped.

use brume_module_sdk::prelude::*;
use serde::Deserialize;

/// The manifest embedded in the module's `brume-manifest` section.
pub const MANIFEST: &str = r#"{
  "name": "threshold",
  "version": "0.1.0",
  "abi_version": 1,
  "inputs": ["sensors/#"],
  "outputs": ["alerts/threshold"],
  "budgets": { "memory_bytes": 2097152, "fuel_per_batch": 50000000, "max_output_readings": 10000 }
}"#;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Readings strictly above this are forwarded.
    limit: f64,
    /// The numeric field compared with `limit`.
    #[serde(default = "default_field")]
    field: String,
}

fn default_field() -> String {
    "value".into()
}

/// The filter.
#[derive(Debug)]
pub struct Threshold {
    limit: f64,
    field: String,
}

impl Default for Threshold {
    fn default() -> Self {
        // Until init runs, forward nothing.
        Threshold { limit: f64::INFINITY, field: default_field() }
    }
}

impl Filter for Threshold {
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        let c: Config = brume_module_sdk::parse_config(config)?;
        if c.limit.is_nan() {
            return Err("limit must be a number".into());
        }
        self.limit = c.limit;
        self.field = c.field;
        Ok(())
    }

    fn keep(&mut self, r: &ModuleReading) -> bool {
        r.number(&self.field).is_some_and(|v| v > self.limit)
    }
}

brume_module_sdk::export_filter!(Threshold, manifest = MANIFEST);

#[cfg(test)]
mod tests {
    use super::*;
    use brume_module_sdk::testing::{Harness, T0, reading};
    use brume_module_sdk::{FilterModule, field};

    fn harness(config: &str) -> Harness<FilterModule<Threshold>> {
        Harness::new(MANIFEST, config).unwrap()
    }

    #[test]
    fn forwards_only_readings_above_the_limit() {
        let mut h = harness(r#"{"limit": 10}"#);
        let out = h
            .process(&[
                reading("sensors/a", T0, 9.0),
                reading("sensors/a", T0 + 1, 10.0),
                reading("sensors/b", T0 + 2, 10.5),
            ])
            .unwrap();
        assert_eq!(
            out.readings,
            [ModuleReading {
                stream: "alerts/threshold".into(),
                ts_ns: T0 + 2,
                fields: vec![field::num("value", 10.5), field::text("source", "sensors/b")],
            }]
        );
    }

    #[test]
    fn configurable_field_and_integers() {
        let mut h = harness(r#"{"limit": 100, "field": "rpm"}"#);
        let r = |ts, v| ModuleReading {
            stream: "sensors/m".into(),
            ts_ns: ts,
            fields: vec![field::int("rpm", v), field::num("value", 1e9)],
        };
        let out = h.process(&[r(T0, 100), r(T0 + 1, 101)]).unwrap();
        assert_eq!(out.readings.len(), 1);
        assert_eq!(out.readings[0].ts_ns, T0 + 1);
    }

    #[test]
    fn config_errors() {
        for (config, want) in [
            ("{}", "invalid config {}: missing field `limit`"),
            (
                r#"{"limit": 1, "feild": "x"}"#,
                "invalid config {\"feild\":\"x\",\"limit\":1}: unknown field `feild`, expected `limit` or `field`",
            ),
            (
                r#"{"limit": "high"}"#,
                "invalid config {\"limit\":\"high\"}: invalid type: string \"high\", expected f64",
            ),
        ] {
            assert_eq!(Harness::<FilterModule<Threshold>>::new(MANIFEST, config).err().unwrap(), want, "{config}");
        }
    }
}
