//! Native testing of modules: an in-memory history and a harness that drives a module
//! through the same byte-level calls as the wasm exports.
//!
//! ```text
//! let mut h = Harness::<MyModule>::new(MANIFEST, r#"{"limit": 5}"#)?;
//! let out = h.process(&[reading("sensors/a", T0, 7.0)])?;
//! assert_eq!(out.readings.len(), 1);
//! h.restart()?; // save_state, fresh instance, init, load_state: as after an agent restart
//! ```
//!
//! Like the agent, the harness stores each input batch in the history *before* processing
//! it (modules get their input from the store), so a module asking for
//! `[ts - window, ts)` sees earlier readings of the same batch but not the current one.

use std::collections::BTreeMap;

use brume_module_abi::{
    Aggregates, CallResult, HistoryKind, HistoryQuery, HistoryResult, InitRequest, Input, Manifest, ModuleReading,
    Output, decode, encode,
};

use crate::rt::Runtime;
use crate::{History, Level, Module, check_manifest, field};

/// A plausible timestamp (2023-11-14T22:13:20Z) in ns: the agent refuses timestamps before 2000.
pub const T0: i64 = 1_700_000_000_000_000_000;
/// One second in ns.
pub const SECOND: i64 = 1_000_000_000;

/// A reading with one numeric field `value`.
pub fn reading(stream: &str, ts_ns: i64, value: f64) -> ModuleReading {
    ModuleReading { stream: stream.to_owned(), ts_ns, fields: vec![field::num("value", value)] }
}

/// An in-memory history with the semantics of the agent's host functions.
#[derive(Debug)]
pub struct MockHistory {
    /// Readings per stream, ordered by timestamp (ties keep insertion order).
    streams: BTreeMap<String, Vec<ModuleReading>>,
    /// Most readings one answer holds, like the host's cap (default 10,000).
    pub cap: u32,
    /// Every query asked, in order.
    pub queries: Vec<HistoryQuery>,
    /// Every log line, in order.
    pub logs: Vec<(Level, String)>,
}

impl Default for MockHistory {
    fn default() -> Self {
        MockHistory { streams: BTreeMap::new(), cap: 10_000, queries: Vec::new(), logs: Vec::new() }
    }
}

impl MockHistory {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a reading.
    pub fn insert(&mut self, r: ModuleReading) {
        let v = self.streams.entry(r.stream.clone()).or_default();
        let at = v.partition_point(|x| x.ts_ns <= r.ts_ns);
        v.insert(at, r);
    }

    /// Adds readings.
    pub fn extend(&mut self, rs: impl IntoIterator<Item = ModuleReading>) {
        rs.into_iter().for_each(|r| self.insert(r));
    }

    fn window(&self, stream: &str, from_ns: i64, to_ns: i64) -> &[ModuleReading] {
        let v = self.streams.get(stream).map(Vec::as_slice).unwrap_or_default();
        let lo = v.partition_point(|r| r.ts_ns < from_ns);
        let hi = v.partition_point(|r| r.ts_ns < to_ns).max(lo);
        &v[lo..hi]
    }
}

impl History for MockHistory {
    fn query(&mut self, q: &HistoryQuery) -> HistoryResult {
        self.queries.push(q.clone());
        match &q.kind {
            HistoryKind::LastN { n, before_ns } => {
                let w = self.window(&q.stream, i64::MIN, *before_ns);
                let n = (*n).min(self.cap) as usize;
                HistoryResult::Readings(w[w.len().saturating_sub(n)..].to_vec())
            }
            HistoryKind::Range { from_ns, to_ns, limit } => {
                let w = self.window(&q.stream, *from_ns, *to_ns);
                HistoryResult::Readings(w.iter().take((*limit).min(self.cap) as usize).cloned().collect())
            }
            HistoryKind::Aggregate { from_ns, to_ns, field } => {
                let vals: Vec<f64> =
                    self.window(&q.stream, *from_ns, *to_ns).iter().filter_map(|r| r.number(field)).collect();
                let count = vals.len() as u64;
                let (min, max, mean) = if vals.is_empty() {
                    (None, None, None)
                } else {
                    (
                        Some(vals.iter().copied().fold(f64::INFINITY, f64::min)),
                        Some(vals.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
                        Some(vals.iter().sum::<f64>() / vals.len() as f64),
                    )
                };
                HistoryResult::Aggregates(Aggregates { count, min, max, mean })
            }
        }
    }

    fn log(&mut self, level: Level, msg: &str) {
        self.logs.push((level, msg.to_owned()));
    }
}

/// Drives a module natively through the ABI's encoded messages, as the agent would.
pub struct Harness<M> {
    rt: Runtime<M>,
    manifest_json: String,
    manifest: Manifest,
    config_json: String,
    /// The history the module's [`crate::Context`] reads. Input batches are added to it
    /// before they are processed.
    pub history: MockHistory,
}

impl<M: Module> Harness<M> {
    /// Checks the manifest, creates the module and initialises it with `config_json`.
    pub fn new(manifest_json: &str, config_json: &str) -> Result<Self, String> {
        let manifest = check_manifest(manifest_json)?;
        let mut h = Harness {
            rt: Runtime::new(manifest_json),
            manifest_json: manifest_json.to_owned(),
            manifest,
            config_json: config_json.to_owned(),
            history: MockHistory::new(),
        };
        h.init()?;
        Ok(h)
    }

    fn init(&mut self) -> Result<(), String> {
        let req = encode(&InitRequest { config_json: self.config_json.clone() });
        reply::<()>(&self.rt.init(&req))
    }

    /// Processes one batch: adds it to the history, runs the module, and checks the output
    /// as the agent would (valid readings, within the manifest's `max_output_readings`).
    pub fn process(&mut self, readings: &[ModuleReading]) -> Result<Output, String> {
        self.history.extend(readings.iter().cloned());
        let input = encode(&Input { readings: readings.to_vec() });
        let out: Output = reply(&self.rt.process(&input, &mut self.history))?;
        if let Some(max) = self.manifest.budgets.max_output_readings
            && out.readings.len() > max as usize
        {
            return Err(format!("{} output readings, manifest budget max_output_readings = {max}", out.readings.len()));
        }
        for r in &out.readings {
            brume_protocol::Reading::new(r.stream.clone(), r.ts_ns, &r.fields)
                .map_err(|e| format!("invalid output reading {r:?}: {e}"))?;
        }
        Ok(out)
    }

    /// The module's saved state, as the agent would persist it.
    pub fn save_state(&self) -> Result<Vec<u8>, String> {
        reply(&self.rt.save_state())
    }

    /// Simulates an agent restart: saves the state, creates a fresh instance, initialises
    /// it with the same config and loads the state.
    pub fn restart(&mut self) -> Result<(), String> {
        let state = self.save_state()?;
        self.rt = Runtime::new(&self.manifest_json);
        self.init()?;
        reply::<()>(&self.rt.load_state(&state))
    }

    /// Loads raw state bytes into the running instance.
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), String> {
        reply::<()>(&self.rt.load_state(state))
    }

    /// The module itself, to inspect its fields in tests.
    pub fn module(&self) -> &M {
        self.rt.module()
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

fn reply<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match decode::<CallResult<T>>(bytes).map_err(|e| format!("cannot decode the module's reply: {e}"))? {
        CallResult::Ok(v) => Ok(v),
        CallResult::Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Context, Emitter, Filter, FilterModule, state};

    const MANIFEST: &str = r#"{"name":"t","version":"0.1.0","abi_version":1,"inputs":["s/#"],"outputs":["out"],"budgets":{"max_output_readings":2}}"#;

    #[test]
    fn mock_history_answers_like_the_host() {
        let mut h = MockHistory::new();
        h.extend((0..5).map(|i| reading("a", T0 + i * SECOND, i as f64)));
        h.insert(reading("b", T0, 100.0));
        let vals = |r: HistoryResult| match r {
            HistoryResult::Readings(rs) => rs.iter().map(|r| r.number("value").unwrap()).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let q = |kind| HistoryQuery { stream: "a".into(), kind };
        assert_eq!(vals(h.query(&q(HistoryKind::LastN { n: 2, before_ns: T0 + 4 * SECOND }))), [2.0, 3.0]);
        assert_eq!(
            vals(h.query(&q(HistoryKind::Range { from_ns: T0 + SECOND, to_ns: T0 + 4 * SECOND, limit: 2 }))),
            [1.0, 2.0]
        );
        h.cap = 1;
        assert_eq!(vals(h.query(&q(HistoryKind::LastN { n: 3, before_ns: i64::MAX }))), [4.0]);
        let agg = h.query(&q(HistoryKind::Aggregate { from_ns: T0, to_ns: T0 + 4 * SECOND, field: "value".into() }));
        assert_eq!(
            agg,
            HistoryResult::Aggregates(Aggregates { count: 4, min: Some(0.0), max: Some(3.0), mean: Some(1.5) })
        );
        let none = h.query(&HistoryQuery {
            stream: "zz".into(),
            kind: HistoryKind::Aggregate { from_ns: 0, to_ns: i64::MAX, field: "value".into() },
        });
        assert_eq!(none, HistoryResult::Aggregates(Aggregates { count: 0, min: None, max: None, mean: None }));
        assert_eq!(h.queries.len(), 5);
    }

    #[derive(Default)]
    struct Positive;
    impl Filter for Positive {
        fn keep(&mut self, r: &ModuleReading) -> bool {
            r.number("value").is_some_and(|v| v > 0.0)
        }
    }

    #[test]
    fn harness_runs_a_filter_and_enforces_the_output_budget() {
        let mut h = Harness::<FilterModule<Positive>>::new(MANIFEST, "").unwrap();
        let out = h.process(&[reading("s/a", T0, 1.0), reading("s/a", T0 + 1, -1.0)]).unwrap();
        assert_eq!(
            out.readings,
            [ModuleReading {
                stream: "out".into(),
                ts_ns: T0,
                fields: vec![field::num("value", 1.0), field::text("source", "s/a")],
            }]
        );
        assert_eq!(out.metrics, [("filter_in".to_string(), 2.0), ("filter_kept".to_string(), 1.0)]);
        let err = h.process(&[reading("s/a", T0 + 2, 1.0), reading("s/a", T0 + 3, 1.0), reading("s/a", T0 + 4, 1.0)]);
        assert_eq!(err.unwrap_err(), "3 output readings, manifest budget max_output_readings = 2");
    }

    /// Counts readings; logs; keeps the count as state.
    #[derive(Default)]
    struct Counter {
        n: u64,
        emit_nan: bool,
    }
    impl Module for Counter {
        fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
            self.emit_nan = config.get("nan").is_some();
            Ok(())
        }
        fn process(&mut self, input: &[ModuleReading], out: &mut Emitter, ctx: &mut Context) -> Result<(), String> {
            self.n += input.len() as u64;
            ctx.log(Level::Info, &format!("n = {}", self.n));
            if self.emit_nan {
                out.emit_value("out", T0, f64::NAN);
            }
            Ok(())
        }
        fn save_state(&self) -> Vec<u8> {
            state::encode(&self.n)
        }
        fn load_state(&mut self, s: &[u8]) -> Result<(), String> {
            self.n = state::decode(s)?;
            Ok(())
        }
    }

    #[test]
    fn harness_restart_keeps_state_and_logs_reach_the_history() {
        let mut h = Harness::<Counter>::new(MANIFEST, "{}").unwrap();
        h.process(&[reading("s/a", T0, 1.0), reading("s/a", T0 + 1, 1.0)]).unwrap();
        h.restart().unwrap();
        assert_eq!(h.module().n, 2);
        h.process(&[reading("s/a", T0 + 2, 1.0)]).unwrap();
        assert_eq!(h.history.logs.last().unwrap(), &(Level::Info, "n = 3".to_string()));
        assert_eq!(
            h.load_state(&[0xff]).unwrap_err(),
            "cannot decode saved state (1 bytes): Hit the end of buffer, expected more data"
        );
    }

    #[test]
    fn harness_reports_invalid_config_and_invalid_output() {
        let err = Harness::<Counter>::new(MANIFEST, "{nope").err().unwrap();
        assert!(err.starts_with("config is not valid JSON: "), "{err}");
        let mut h = Harness::<Counter>::new(MANIFEST, r#"{"nan":1}"#).unwrap();
        let err = h.process(&[reading("s/a", T0, 1.0)]).unwrap_err();
        assert!(err.starts_with("invalid output reading"), "{err}");
        assert!(err.contains("only finite numbers are allowed"), "{err}");
    }
}
