//! Unit conversion (a map): for each reading with the numeric `field`, emits to `converted`
//! the reading's fields with `to_field = field * factor + offset` (replacing `to_field` if
//! present) and the input stream as `source`. Readings without the field are dropped.
//!
//! Config: `{"field": "celsius", "factor": 1.8, "offset": 32, "to_field": "fahrenheit"}`.
//! Defaults: `field` = `value`, `factor` = 1, `offset` = 0, `to_field` = `field`.

use brume_module_sdk::parse_config;
use brume_module_sdk::prelude::*;
use serde::Deserialize;

/// The manifest embedded in the module's `brume-manifest` section.
pub const MANIFEST: &str = r#"{
  "name": "unit-convert",
  "version": "0.1.0",
  "abi_version": 1,
  "inputs": ["sensors/#"],
  "outputs": ["converted"],
  "budgets": { "memory_bytes": 2097152, "fuel_per_batch": 50000000, "max_output_readings": 10000 }
}"#;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_field")]
    field: String,
    #[serde(default = "one")]
    factor: f64,
    #[serde(default)]
    offset: f64,
    to_field: Option<String>,
}

fn default_field() -> String {
    "value".into()
}

fn one() -> f64 {
    1.0
}

/// The map.
#[derive(Debug)]
pub struct UnitConvert {
    field: String,
    factor: f64,
    offset: f64,
    to_field: String,
}

impl Default for UnitConvert {
    fn default() -> Self {
        UnitConvert { field: default_field(), factor: 1.0, offset: 0.0, to_field: default_field() }
    }
}

impl Map for UnitConvert {
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        let c: Config = parse_config(config)?;
        if !(c.factor.is_finite() && c.offset.is_finite()) {
            return Err("factor and offset must be finite numbers".into());
        }
        self.to_field = c.to_field.unwrap_or_else(|| c.field.clone());
        if self.to_field.is_empty() || self.to_field == "source" {
            return Err(format!("to_field {:?} is not allowed", self.to_field));
        }
        self.field = c.field;
        self.factor = c.factor;
        self.offset = c.offset;
        Ok(())
    }

    fn map(&mut self, r: &ModuleReading) -> Result<Option<Vec<Field>>, String> {
        let Some(v) = r.number(&self.field) else { return Ok(None) };
        let converted = v * self.factor + self.offset;
        if !converted.is_finite() {
            return Ok(None); // overflow: nothing sensible to send
        }
        let mut fields: Vec<Field> =
            r.fields.iter().filter(|f| f.name != self.to_field && f.name != "source").cloned().collect();
        fields.push(field::num(&self.to_field, converted));
        fields.push(field::text("source", &r.stream));
        Ok(Some(fields))
    }
}

brume_module_sdk::export_map!(UnitConvert, manifest = MANIFEST);

#[cfg(test)]
mod tests {
    use super::*;
    use brume_module_sdk::MapModule;
    use brume_module_sdk::testing::{Harness, T0, reading};

    #[test]
    fn celsius_to_fahrenheit_keeps_other_fields() {
        let config = r#"{"field": "celsius", "factor": 1.8, "offset": 32, "to_field": "fahrenheit"}"#;
        let mut h = Harness::<MapModule<UnitConvert>>::new(MANIFEST, config).unwrap();
        let r = ModuleReading {
            stream: "sensors/t".into(),
            ts_ns: T0,
            fields: vec![field::num("celsius", 100.0), field::boolean("ok", true)],
        };
        let out = h.process(&[r, reading("sensors/t", T0 + 1, 3.0)]).unwrap();
        assert_eq!(
            out.readings,
            [ModuleReading {
                stream: "converted".into(),
                ts_ns: T0,
                fields: vec![
                    field::num("celsius", 100.0),
                    field::boolean("ok", true),
                    field::num("fahrenheit", 212.0),
                    field::text("source", "sensors/t"),
                ],
            }]
        );
    }

    #[test]
    fn converts_in_place_by_default() {
        let mut h = Harness::<MapModule<UnitConvert>>::new(MANIFEST, r#"{"factor": 1000}"#).unwrap();
        let out = h.process(&[reading("sensors/kw", T0, 1.5)]).unwrap();
        assert_eq!(out.readings[0].fields, [field::num("value", 1500.0), field::text("source", "sensors/kw")]);
    }

    #[test]
    fn config_errors() {
        for (config, want) in [
            (r#"{"to_field": "source"}"#, "to_field \"source\" is not allowed"),
            (r#"{"factor": "x"}"#, "invalid config {\"factor\":\"x\"}: invalid type: string \"x\", expected f64"),
        ] {
            assert_eq!(Harness::<MapModule<UnitConvert>>::new(MANIFEST, config).err().unwrap(), want);
        }
    }
}
