//! Downsampling: per stream and per fixed window of `window_s` seconds (aligned to the
//! Unix epoch), emits one reading to `downsampled` with the `min`, `mean`, `max` and
//! `count` of the numeric `field`, the input stream as `source`, and the window's start as
//! timestamp.
//!
//! A window closes when a reading of a later window arrives on its stream (an agent only
//! knows a window is complete when it sees later data); readings older than the open window
//! are dropped and counted in the `downsample_late` metric.
//!
//! Config: `{"window_s": 60, "field": "value"}` (both optional).
//! State: the open window's partial aggregates per stream, persisted through `save_state`,
//! so the outputs after an agent restart are identical to an uninterrupted run.

use std::collections::BTreeMap;

use brume_module_sdk::prelude::*;
use brume_module_sdk::{parse_config, state};
use serde::{Deserialize, Serialize};

/// The manifest embedded in the module's `brume-manifest` section.
pub const MANIFEST: &str = r#"{
  "name": "downsample",
  "version": "0.1.0",
  "abi_version": 1,
  "inputs": ["sensors/#"],
  "outputs": ["downsampled"],
  "budgets": { "memory_bytes": 4194304, "fuel_per_batch": 50000000, "max_output_readings": 10000 }
}"#;

const NS_PER_S: i64 = 1_000_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Window length in whole seconds.
    #[serde(default = "default_window_s")]
    window_s: u32,
    /// The numeric field aggregated.
    #[serde(default = "default_field")]
    field: String,
}

fn default_window_s() -> u32 {
    60
}

fn default_field() -> String {
    "value".into()
}

/// Partial aggregates of one stream's open window. Part of the saved state (postcard:
/// append new fields at the end only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Open {
    /// Window start, inclusive, ns.
    start_ns: i64,
    /// Window end, exclusive, ns. Stored rather than derived from the config, so a
    /// window opened before a config change still closes where it was meant to.
    end_ns: i64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

/// The module.
#[derive(Debug)]
pub struct Downsample {
    window_ns: i64,
    field: String,
    open: BTreeMap<String, Open>,
}

impl Default for Downsample {
    fn default() -> Self {
        Downsample {
            window_ns: i64::from(default_window_s()) * NS_PER_S,
            field: default_field(),
            open: BTreeMap::new(),
        }
    }
}

/// A new window of `window_ns` holding `ts_ns`, with one value.
fn open_window(window_ns: i64, ts_ns: i64, v: f64) -> Open {
    let start_ns = ts_ns.div_euclid(window_ns) * window_ns;
    Open { start_ns, end_ns: start_ns.saturating_add(window_ns), count: 1, sum: v, min: v, max: v }
}

fn close(out: &mut Emitter, stream: &str, w: &Open) {
    out.emit(
        out.default_output(),
        w.start_ns,
        vec![
            field::num("min", w.min),
            field::num("mean", w.sum / w.count as f64),
            field::num("max", w.max),
            field::int("count", w.count as i64),
            field::text("source", stream),
        ],
    );
}

impl Module for Downsample {
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        let c: Config = parse_config(config)?;
        if c.window_s == 0 {
            return Err("window_s must be at least 1".into());
        }
        self.window_ns = i64::from(c.window_s) * NS_PER_S;
        self.field = c.field;
        Ok(())
    }

    fn process(&mut self, input: &[ModuleReading], out: &mut Emitter, _ctx: &mut Context) -> Result<(), String> {
        let mut late = 0;
        for r in input {
            let Some(v) = r.number(&self.field) else { continue };
            match self.open.get_mut(&r.stream) {
                Some(w) if r.ts_ns < w.start_ns => late += 1,
                Some(w) if r.ts_ns < w.end_ns => {
                    w.count += 1;
                    w.sum += v;
                    w.min = w.min.min(v);
                    w.max = w.max.max(v);
                }
                Some(w) => {
                    close(out, &r.stream, w);
                    *w = open_window(self.window_ns, r.ts_ns, v);
                }
                None => {
                    let w = open_window(self.window_ns, r.ts_ns, v);
                    self.open.insert(r.stream.clone(), w);
                }
            }
        }
        out.metric("downsample_late", f64::from(late));
        out.metric("downsample_open_windows", self.open.len() as f64);
        Ok(())
    }

    fn save_state(&self) -> Vec<u8> {
        state::encode(&self.open)
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.open = state::decode(bytes)?;
        Ok(())
    }
}

brume_module_sdk::export!(Downsample, manifest = MANIFEST);

#[cfg(test)]
mod tests {
    use super::*;
    use brume_module_sdk::Output;
    use brume_module_sdk::testing::{Harness, SECOND, reading};

    /// A window-aligned start: 2023-11-14T22:00:00Z.
    const W0: i64 = 1_699_999_200 * SECOND;

    fn harness(config: &str) -> Harness<Downsample> {
        Harness::new(MANIFEST, config).unwrap()
    }

    fn rows(out: &Output) -> Vec<String> {
        out.readings
            .iter()
            .map(|r| {
                let f: Vec<String> = r
                    .fields
                    .iter()
                    .map(|f| match &f.value {
                        Value::F64(v) => format!("{}={v}", f.name),
                        Value::I64(v) => format!("{}={v}", f.name),
                        Value::Str(v) => format!("{}={v}", f.name),
                        Value::Bool(v) => format!("{}={v}", f.name),
                    })
                    .collect();
                format!("{} +{}s {}", r.stream, (r.ts_ns - W0) / SECOND, f.join(" "))
            })
            .collect()
    }

    #[test]
    fn closes_a_window_when_a_later_one_starts() {
        let mut h = harness(r#"{"window_s": 10}"#);
        let out = h
            .process(&[
                reading("sensors/a", W0 + SECOND, 4.0),
                reading("sensors/a", W0 + 5 * SECOND, 2.0),
                reading("sensors/a", W0 + 9 * SECOND, 6.0),
                reading("sensors/a", W0 + 10 * SECOND, 1.0),
            ])
            .unwrap();
        assert_eq!(rows(&out), ["downsampled +0s min=2 mean=4 max=6 count=3 source=sensors/a"]);
        // Empty windows produce nothing; the next reading closes +10s.
        let out = h.process(&[reading("sensors/a", W0 + 35 * SECOND, 0.0)]).unwrap();
        assert_eq!(rows(&out), ["downsampled +10s min=1 mean=1 max=1 count=1 source=sensors/a"]);
    }

    #[test]
    fn streams_have_their_own_windows_and_late_readings_are_dropped() {
        let mut h = harness(r#"{"window_s": 10}"#);
        let out = h
            .process(&[
                reading("sensors/a", W0, 1.0),
                reading("sensors/b", W0 + 12 * SECOND, 5.0),
                reading("sensors/a", W0 + 11 * SECOND, 3.0),
                reading("sensors/b", W0 + 3 * SECOND, 7.0),
            ])
            .unwrap();
        assert_eq!(rows(&out), ["downsampled +0s min=1 mean=1 max=1 count=1 source=sensors/a"]);
        assert_eq!(out.metrics, [("downsample_late".into(), 1.0), ("downsample_open_windows".into(), 2.0)]);
    }

    /// The issue's restart property: a restart at any batch boundary gives the same outputs
    /// as an uninterrupted run.
    #[test]
    fn restart_at_any_point_gives_identical_outputs() {
        let input: Vec<ModuleReading> = (0..200)
            .map(|i| {
                let stream = if i % 3 == 0 { "sensors/a" } else { "sensors/b" };
                reading(stream, W0 + i * 700_000_000, ((i * 37) % 11) as f64 * 0.1)
            })
            .collect();
        let batches: Vec<&[ModuleReading]> = input.chunks(7).collect();
        let run = |restart_after: Option<usize>| {
            let mut h = harness(r#"{"window_s": 15}"#);
            let mut all = Vec::new();
            for (i, b) in batches.iter().enumerate() {
                all.extend(h.process(b).unwrap().readings);
                if Some(i) == restart_after {
                    h.restart().unwrap();
                }
            }
            all
        };
        let want = run(None);
        assert_eq!(want.len(), 18, "9 closed windows per stream");
        for k in 0..batches.len() {
            assert_eq!(run(Some(k)), want, "restart after batch {k}");
        }
    }

    #[test]
    fn config_errors() {
        for (config, want) in [
            (r#"{"window_s": 0}"#, "window_s must be at least 1"),
            (
                r#"{"window_s": 1.5}"#,
                "invalid config {\"window_s\":1.5}: invalid type: floating point `1.5`, expected u32",
            ),
        ] {
            assert_eq!(Harness::<Downsample>::new(MANIFEST, config).err().unwrap(), want);
        }
    }
}
