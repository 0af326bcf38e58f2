//! Z-score anomaly detector over the agent's local history.
//!
//! For each reading with a numeric `field`, asks the host for the mean of that field on the
//! same stream over the preceding `window_s` seconds (`[ts - window, ts)`, so the reading
//! itself is excluded) and for the last `max_points` readings of that window to estimate
//! the standard deviation around that mean (the ABI's aggregates have no variance). When
//! the window has at least `min_count` readings and `|value - mean| / stddev > z`, emits to
//! `anomalies` a reading with `value`, `mean`, `stddev`, `z` and `source`.
//!
//! Because it reads history instead of keeping state, it computes over the last hour right
//! after an agent restart or an outage. It needs no saved state.
//!
//! Config (all optional): `{"z": 3.0, "window_s": 3600, "field": "value", "min_count": 10,
//! "max_points": 200}`.

use brume_module_sdk::parse_config;
use brume_module_sdk::prelude::*;
use serde::Deserialize;

/// The manifest embedded in the module's `brume-manifest` section.
pub const MANIFEST: &str = r#"{
  "name": "zscore",
  "version": "0.1.0",
  "abi_version": 1,
  "inputs": ["sensors/#"],
  "outputs": ["anomalies"],
  "budgets": { "memory_bytes": 8388608, "fuel_per_batch": 2000000000, "max_output_readings": 1000 }
}"#;

const NS_PER_S: i64 = 1_000_000_000;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// Threshold on |z|.
    z: f64,
    /// History window before each reading, in seconds.
    window_s: u32,
    /// The numeric field.
    field: String,
    /// Fewer readings than this in the window: no verdict.
    min_count: u32,
    /// Most recent readings used for the standard deviation.
    max_points: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config { z: 3.0, window_s: 3600, field: "value".into(), min_count: 10, max_points: 200 }
    }
}

/// The module.
#[derive(Debug, Default)]
pub struct ZScore {
    c: Config,
}

impl Module for ZScore {
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        let c: Config = parse_config(config)?;
        if !(c.z > 0.0 && c.z.is_finite()) {
            return Err(format!("z must be a finite number > 0, got {}", c.z));
        }
        if c.window_s == 0 {
            return Err("window_s must be at least 1".into());
        }
        if c.min_count < 2 || c.max_points < 2 {
            return Err("min_count and max_points must be at least 2".into());
        }
        self.c = c;
        Ok(())
    }

    fn process(&mut self, input: &[ModuleReading], out: &mut Emitter, ctx: &mut Context) -> Result<(), String> {
        let window_ns = i64::from(self.c.window_s) * NS_PER_S;
        let (mut judged, mut anomalies) = (0, 0);
        for r in input {
            let Some(v) = r.number(&self.c.field) else { continue };
            let from = r.ts_ns.saturating_sub(window_ns);
            let agg = ctx.aggregate(&r.stream, from, r.ts_ns, &self.c.field)?;
            let Some(mean) = agg.mean.filter(|_| agg.count >= u64::from(self.c.min_count)) else { continue };
            let n = agg.count.min(u64::from(self.c.max_points)) as u32;
            let points = ctx.last_n(&r.stream, n, r.ts_ns)?;
            let xs: Vec<f64> =
                points.iter().filter(|p| p.ts_ns >= from).filter_map(|p| p.number(&self.c.field)).collect();
            if xs.len() < 2 {
                continue;
            }
            let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (xs.len() - 1) as f64;
            let stddev = var.sqrt();
            judged += 1;
            if stddev.is_nan() || stddev <= 0.0 {
                continue; // a flat history gives no scale to judge a deviation by
            }
            let z = (v - mean) / stddev;
            if z.abs() > self.c.z {
                anomalies += 1;
                out.emit(
                    out.default_output(),
                    r.ts_ns,
                    vec![
                        field::num("value", v),
                        field::num("mean", mean),
                        field::num("stddev", stddev),
                        field::num("z", z),
                        field::text("source", &r.stream),
                    ],
                );
            }
        }
        out.metric("zscore_judged", f64::from(judged));
        out.metric("zscore_anomalies", f64::from(anomalies));
        Ok(())
    }
}

brume_module_sdk::export!(ZScore, manifest = MANIFEST);

#[cfg(test)]
mod tests {
    use super::*;
    use brume_module_sdk::testing::{Harness, SECOND, T0, reading};
    use brume_module_sdk::{HistoryKind, Value};

    /// 0, 1, 0, 1, ...: mean 0.5, sample stddev ≈ 0.5.
    fn calm(stream: &str, from: i64, n: i64) -> Vec<ModuleReading> {
        (0..n).map(|i| reading(stream, from + i * SECOND, (i % 2) as f64)).collect()
    }

    #[test]
    fn flags_outliers_against_the_history_window() {
        let mut h = Harness::<ZScore>::new(MANIFEST, r#"{"window_s": 60}"#).unwrap();
        // History written before the module ran (e.g. during an outage of the module).
        h.history.extend(calm("sensors/a", T0, 40));
        let t = T0 + 40 * SECOND;
        let out = h.process(&[reading("sensors/a", t, 0.9), reading("sensors/a", t + SECOND, 5.0)]).unwrap();
        assert_eq!(out.readings.len(), 1, "{:?}", out.readings);
        let a = &out.readings[0];
        assert_eq!((a.stream.as_str(), a.ts_ns, a.number("value")), ("anomalies", t + SECOND, Some(5.0)));
        let z = a.number("z").unwrap();
        assert!(z > 8.0 && z < 9.0, "z = {z}");
        assert_eq!(a.fields.last().unwrap().value, Value::Str("sensors/a".into()));
        assert_eq!(out.metrics, [("zscore_judged".into(), 2.0), ("zscore_anomalies".into(), 1.0)]);
        // The second reading's window [t+1s-60s, t+1s) includes the first of the batch
        // (the batch is in the history before it is processed) but not itself.
        match &h.history.queries[2].kind {
            HistoryKind::Aggregate { from_ns, to_ns, .. } => {
                assert_eq!((*from_ns, *to_ns), (t - 59 * SECOND, t + SECOND))
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn no_verdict_with_too_little_or_flat_history() {
        let mut h = Harness::<ZScore>::new(MANIFEST, r#"{"min_count": 10}"#).unwrap();
        h.history.extend(calm("sensors/a", T0, 9));
        h.history.extend((0..20).map(|i| reading("sensors/flat", T0 + i * SECOND, 1.0)));
        let out = h
            .process(&[reading("sensors/a", T0 + 9 * SECOND, 100.0), reading("sensors/flat", T0 + 20 * SECOND, 100.0)])
            .unwrap();
        assert!(out.readings.is_empty());
        assert_eq!(out.metrics[0], ("zscore_judged".into(), 1.0));
    }

    #[test]
    fn window_excludes_old_history() {
        let mut h = Harness::<ZScore>::new(MANIFEST, r#"{"window_s": 10, "min_count": 5}"#).unwrap();
        // Wild values long ago, calm values in the last 10 s.
        h.history.extend((0..20).map(|i| reading("sensors/a", T0 + i * SECOND, if i % 2 == 0 { -50.0 } else { 50.0 })));
        h.history.extend(calm("sensors/a", T0 + 100 * SECOND, 10));
        let out = h.process(&[reading("sensors/a", T0 + 110 * SECOND, 4.0)]).unwrap();
        assert_eq!(out.readings.len(), 1);
    }

    #[test]
    fn config_errors() {
        for (config, want) in [
            (r#"{"z": 0}"#, "z must be a finite number > 0, got 0"),
            (r#"{"min_count": 1}"#, "min_count and max_points must be at least 2"),
            (
                r#"{"window": 5}"#,
                "invalid config {\"window\":5}: unknown field `window`, expected one of `z`, `window_s`, `field`, `min_count`, `max_points`",
            ),
        ] {
            assert_eq!(Harness::<ZScore>::new(MANIFEST, config).err().unwrap(), want);
        }
    }
}
