//! Deadband (change-only) compression: forwards a reading to `deadband` only when its
//! numeric `field` differs from the last *forwarded* value of the same stream by at least
//! `band`. The first reading of a stream is always forwarded.
//!
//! Config: `{"band": 0.5, "field": "value"}` (`band` is required, ≥ 0).
//! State: the last forwarded value per stream, persisted through `save_state`, so an agent
//! restart does not re-send an unchanged value.

use std::collections::BTreeMap;

use brume_module_sdk::prelude::*;
use brume_module_sdk::{parse_config, state};
use serde::Deserialize;

/// The manifest embedded in the module's `brume-manifest` section.
pub const MANIFEST: &str = r#"{
  "name": "deadband",
  "version": "0.1.0",
  "abi_version": 1,
  "inputs": ["sensors/#"],
  "outputs": ["deadband"],
  "budgets": { "memory_bytes": 2097152, "fuel_per_batch": 50000000, "max_output_readings": 10000 }
}"#;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Smallest change that is forwarded.
    band: f64,
    /// The numeric field compared.
    #[serde(default = "default_field")]
    field: String,
}

fn default_field() -> String {
    "value".into()
}

/// The module.
#[derive(Debug)]
pub struct Deadband {
    band: f64,
    field: String,
    /// Last forwarded value per stream (a BTreeMap so the saved state is deterministic).
    last: BTreeMap<String, f64>,
}

impl Default for Deadband {
    fn default() -> Self {
        Deadband { band: 0.0, field: default_field(), last: BTreeMap::new() }
    }
}

impl Module for Deadband {
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        let c: Config = parse_config(config)?;
        if !(c.band >= 0.0 && c.band.is_finite()) {
            return Err(format!("band must be a finite number >= 0, got {}", c.band));
        }
        self.band = c.band;
        self.field = c.field;
        Ok(())
    }

    fn process(&mut self, input: &[ModuleReading], out: &mut Emitter, _ctx: &mut Context) -> Result<(), String> {
        let to = out.default_output();
        let mut forwarded = 0;
        for r in input {
            let Some(v) = r.number(&self.field) else { continue };
            let changed = match self.last.get(&r.stream) {
                None => true,
                Some(last) => (v - last).abs() >= self.band,
            };
            if changed {
                self.last.insert(r.stream.clone(), v);
                out.forward(to, r);
                forwarded += 1;
            }
        }
        out.metric("deadband_in", input.len() as f64);
        out.metric("deadband_forwarded", f64::from(forwarded));
        Ok(())
    }

    fn save_state(&self) -> Vec<u8> {
        state::encode(&self.last)
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.last = state::decode(bytes)?;
        Ok(())
    }
}

brume_module_sdk::export!(Deadband, manifest = MANIFEST);

#[cfg(test)]
mod tests {
    use super::*;
    use brume_module_sdk::testing::{Harness, T0, reading};

    fn values(out: &brume_module_sdk::Output) -> Vec<(String, f64)> {
        out.readings
            .iter()
            .map(|r| {
                let src = match &r.fields.iter().find(|f| f.name == "source").unwrap().value {
                    Value::Str(s) => s.clone(),
                    v => panic!("{v:?}"),
                };
                (src, r.number("value").unwrap())
            })
            .collect()
    }

    fn batch(stream: &str, t: i64, vals: &[f64]) -> Vec<ModuleReading> {
        vals.iter().enumerate().map(|(i, v)| reading(stream, t + i as i64, *v)).collect()
    }

    #[test]
    fn forwards_changes_of_at_least_band_from_the_last_forwarded_value() {
        let mut h = Harness::<Deadband>::new(MANIFEST, r#"{"band": 1.0}"#).unwrap();
        // 10.6 and 10.9 drift less than 1 from the forwarded 10.0; 11.0 does not.
        let out = h.process(&batch("sensors/a", T0, &[10.0, 10.6, 10.9, 11.0, 9.5, 10.4])).unwrap();
        assert_eq!(values(&out), [("sensors/a".into(), 10.0), ("sensors/a".into(), 11.0), ("sensors/a".into(), 9.5)]);
        assert_eq!(out.metrics, [("deadband_in".into(), 6.0), ("deadband_forwarded".into(), 3.0)]);
    }

    #[test]
    fn streams_are_independent() {
        let mut h = Harness::<Deadband>::new(MANIFEST, r#"{"band": 5}"#).unwrap();
        let mut input = batch("sensors/a", T0, &[1.0, 2.0]);
        input.extend(batch("sensors/b", T0, &[1.0, 7.0]));
        let out = h.process(&input).unwrap();
        assert_eq!(values(&out), [("sensors/a".into(), 1.0), ("sensors/b".into(), 1.0), ("sensors/b".into(), 7.0)]);
    }

    #[test]
    fn state_survives_a_restart() {
        let vals = [1.0, 1.2, 3.0, 3.1, 2.5, 0.9, 5.0, 5.5];
        let mut straight = Harness::<Deadband>::new(MANIFEST, r#"{"band": 1}"#).unwrap();
        let want = values(&straight.process(&batch("sensors/a", T0, &vals)).unwrap());

        let mut restarted = Harness::<Deadband>::new(MANIFEST, r#"{"band": 1}"#).unwrap();
        let mut got = values(&restarted.process(&batch("sensors/a", T0, &vals[..3])).unwrap());
        restarted.restart().unwrap();
        got.extend(values(&restarted.process(&batch("sensors/a", T0 + 3, &vals[3..])).unwrap()));
        assert_eq!(got, want);
        assert_eq!(want.len(), 4);
    }

    #[test]
    fn config_errors() {
        for (config, want) in [
            ("{}", "invalid config {}: missing field `band`"),
            (r#"{"band": -1}"#, "band must be a finite number >= 0, got -1"),
        ] {
            assert_eq!(Harness::<Deadband>::new(MANIFEST, config).err().unwrap(), want);
        }
    }
}
