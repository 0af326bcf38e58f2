//! Benchmark 1: MQTT ingest, one reading per PUBLISH, QoS 1, 100 in flight.
//!
//! The agent runs in-process (`edge_agent::run` on its own multi-threaded runtime, like the
//! binary) with forwarding off and HTTP disabled; the publisher is one rumqttc
//! `AsyncClient` (inflight 100) on its own current-thread runtime. The same client and
//! payloads are then pointed at a private mosquitto (no persistence) for the comparison.
//! Timed: from the first publish to the N-th PUBACK.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_agent::config::{Config, Durability, ForwardMode};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// Topics the publisher rotates over.
pub const TOPICS: usize = 8;
/// The payload of every PUBLISH: one reading with one float field.
pub const PAYLOAD: &[u8] = br#"{"v":1.5}"#;

/// Publishes `n` readings to 127.0.0.1:`port` and returns readings/s from the first
/// publish to the last PUBACK.
pub fn publish_rate(port: u16, n: usize, client_id: &str) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let id = client_id.to_string();
    rt.block_on(async move {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(100);
        let (client, mut el) = AsyncClient::new(opts, 1000);
        // Connect before the clock starts.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("connecting to 127.0.0.1:{port}: {e}"),
                Err(_) => bail!("no CONNACK from 127.0.0.1:{port} within 10 s"),
            }
        }
        let topics: Vec<String> = (0..TOPICS).map(|i| format!("bench/{i}")).collect();
        let start = Instant::now();
        let publisher = {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0..n {
                    client.publish(topics[i % TOPICS].clone(), QoS::AtLeastOnce, false, PAYLOAD).await?;
                }
                anyhow::Ok(())
            })
        };
        let mut acked = 0usize;
        let deadline = start + Duration::from_secs(120);
        while acked < n {
            let ev = tokio::time::timeout_at(deadline.into(), el.poll())
                .await
                .with_context(|| format!("only {acked} of {n} PUBACKs within 120 s"))?;
            match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => bail!("connection to 127.0.0.1:{port} failed after {acked} PUBACKs: {e}"),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        publisher.await??;
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
        Ok(n as f64 / secs)
    })
}

/// One sample against a fresh in-process agent: readings/s, after checking that the store
/// holds all `n` readings.
pub fn agent_rate(n: usize, durability: Durability) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut cfg = Config { agent_id: "bench".into(), data_dir: dir.path().join("data"), ..Default::default() };
    cfg.store.durability = durability;
    cfg.forward.mode = ForwardMode::Off;
    cfg.http.enabled = false;
    cfg.listener.enabled = true;
    cfg.validate()?;

    let shutdown = CancellationToken::new();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let agent = {
        let shutdown = shutdown.clone();
        let cfg = cfg.clone();
        std::thread::Builder::new().name("agent".into()).spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                addr_tx.send(l.local_addr()?.port())?;
                edge_agent::run(cfg, edge_agent::Listeners { mqtt: Some(l), http: None }, shutdown).await
            })
        })?
    };
    let port = addr_rx.recv_timeout(Duration::from_secs(10)).context("the agent did not start")?;
    let rate = publish_rate(port, n, "bench-agent");
    shutdown.cancel();
    agent.join().map_err(|_| anyhow::anyhow!("agent thread panicked"))??;
    let rate = rate?;
    let stored = count_readings(&cfg.data_dir)?;
    if stored != n as u64 {
        bail!("the agent stored {stored} readings, expected {n}");
    }
    Ok(rate)
}

/// Readings in an agent data directory (after the agent stopped).
pub fn count_readings(data_dir: &Path) -> Result<u64> {
    let conn = rusqlite::Connection::open(edge_agent::store::Store::db_path(data_dir))?;
    Ok(conn.query_row("SELECT COUNT(*) FROM readings", [], |r| r.get::<_, i64>(0))? as u64)
}
