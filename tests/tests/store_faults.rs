//! The agent's store on a disk that fills up: commits fail, nothing is acknowledged,
//! `/healthz` says so, and the agent recovers by itself when space returns.
//!
//! Needs root to mount a small tmpfs (CI runs as root, with `BRUME_REQUIRE_ALL=1`, so
//! there it fails if it cannot). Elsewhere it is reported as skipped
//! ([`brume_e2e::skip`]), never as passed.

use std::time::Duration;

use brume_e2e::wait_until;
use edge_agent::config::{Config, ForwardMode};
use tokio_util::sync::CancellationToken;

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<(Tmpfs, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| (Tmpfs(dir.path().to_path_buf()), dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn post(url: &str, body: String) -> u16 {
    reqwest::Client::new()
        .post(format!("{url}/api/v1/write?stream=fill"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Disk full: the agent refuses (503) instead of acknowledging, reports it on /healthz and
/// in metrics, keeps everything it had acknowledged, and accepts again once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_then_recovers() {
    let Some((mnt, _keep)) = Tmpfs::mount("4m") else {
        brume_e2e::skip("disk_full_refuses_then_recovers", "cannot mount a tmpfs (needs root)");
        return;
    };
    // Leave ~1.5 MiB free: fill the rest with a file we can delete later.
    let filler = mnt.0.join("filler");
    std::fs::write(&filler, vec![0u8; 2_500_000]).unwrap();

    let mut cfg = Config { data_dir: mnt.0.join("data"), ..Config::default() };
    cfg.forward.mode = ForwardMode::Off;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", http.local_addr().unwrap());
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run(
        cfg.clone(),
        edge_agent::Listeners { mqtt: None, http: Some(http) },
        stop.clone(),
    ));

    let body = |k: usize| {
        let rows: Vec<String> =
            (0..500).map(|i| format!("{{\"k\":{k},\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(100))).collect();
        format!("[{}]", rows.join(","))
    };
    let mut accepted = 0usize;
    let mut refused = None;
    for k in 0..200 {
        match post(&url, body(k)).await {
            204 => accepted += 1,
            code => {
                refused = Some(code);
                break;
            }
        }
    }
    assert_eq!(refused, Some(503), "a full disk is refused with 503 after {accepted} accepted bodies");
    assert!(accepted > 0);
    let health = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    assert!(health.text().await.unwrap().contains("disk_full"));
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("brume_agent_store_errors_total{kind=\"disk_full\"}"), "{metrics}");

    // Space returns: the next write succeeds without restarting anything.
    std::fs::remove_file(&filler).unwrap();
    wait_until("the agent to accept writes again", Duration::from_secs(10), || async {
        post(&url, body(999)).await == 204
    })
    .await
    .unwrap();
    assert_eq!(reqwest::get(format!("{url}/healthz")).await.unwrap().status().as_u16(), 200);

    // Everything acknowledged is there, after a clean restart too.
    stop.cancel();
    agent.await.unwrap().unwrap();
    let reader = edge_agent::store::StoreReader::open(&cfg.data_dir, "x").unwrap();
    let stored = reader.readings("fill", i64::MIN, i64::MAX, 1_000_000).unwrap().len();
    assert_eq!(stored, (accepted + 1) * 500, "every acknowledged reading is stored, nothing else");
}
