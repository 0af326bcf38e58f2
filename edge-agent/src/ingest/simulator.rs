//! Simulated sensors for the demo and benchmarks: `simulator.streams` streams named
//! `sim/<n>`, each a noisy sine wave with a `value` (float), a `seq` (integer) and an `ok`
//! (boolean) field, written in batches of `simulator.batch` at `simulator.rate` readings/s.

use std::sync::Arc;
use std::time::Duration;

use brume_protocol::{Field, Reading, Value};
use tokio_util::sync::CancellationToken;

use crate::config::SimulatorConfig;
use crate::metrics::Metrics;
use crate::store::writer::StoreHandle;

/// Generates `n` readings starting at counter `start`, spread over `streams`.
pub fn generate(start: u64, n: usize, streams: usize, now_ns: i64) -> Vec<Reading> {
    (0..n as u64)
        .map(|i| {
            let k = start + i;
            let stream = (k % streams as u64) as usize;
            let x = (k / streams as u64) as f64;
            let value = 20.0 + 5.0 * (x / 60.0).sin() + ((k * 2_654_435_761) % 1000) as f64 / 1000.0;
            let fields = [
                Field { name: "value".into(), value: Value::F64(value) },
                Field { name: "seq".into(), value: Value::I64(k as i64) },
                Field { name: "ok".into(), value: Value::Bool(value < 25.5) },
            ];
            Reading::new(format!("sim/{stream}"), now_ns + i as i64, &fields).expect("simulated readings are valid")
        })
        .collect()
}

/// Runs the simulator until `shutdown`.
pub async fn run(cfg: SimulatorConfig, store: StoreHandle, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let period = Duration::from_secs_f64(cfg.batch as f64 / cfg.rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counter = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let readings = generate(counter, cfg.batch, cfg.streams, crate::now_ns());
        metrics.received("simulator", readings.len() as u64);
        match store.append(readings).await {
            Ok(()) => counter += cfg.batch as u64,
            Err(e) => tracing::warn!(error = %e, "simulated readings refused"),
        }
    }
}
