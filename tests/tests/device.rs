//! The device suite: the agent as shipped to ARM boards (`cargo xtask cross aarch64
//! armv7`: the `device` profile, runtime-only, no compiler), run under qemu-user against a
//! native mosquitto and hub.
//!
//! Per architecture, one emulated agent:
//! - ingests readings over MQTT from a sensor that publishes each until its PUBACK
//!   (store commit), and is killed with SIGKILL mid-stream and restarted on the same
//!   data directory (crash recovery, restart durability);
//! - runs the threshold example from its own config, precompiled for the target by
//!   `cloud-hub module precompile` (native aarch64 code; Pulley bytecode on armv7);
//! - runs the downsample example deployed through the hub to the agents whose presence
//!   says `brume.arch=<target>`: the hub precompiled it on upload and the agent
//!   downloads the code for its architecture;
//! - forwards everything to the hub: every reading arrives once, every alert once, every
//!   window exactly as an uninterrupted run computes it, each with its module's lineage.
//!
//! The binaries are built by `scripts/test.sh` (`cargo xtask cross aarch64 armv7`); with
//! `BRUME_SKIP_CROSS=1` they are not, and these tests say they were skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use brume_e2e::{Agent, Hub, Mosquitto, arrival_order, model_downsample, skip, wait_until, windows};
use brume_signing::SecretKey;
use brume_test_support::built_module;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");
/// Timestamp of reading 0, ms: a whole second, so 1 s windows start at reading 0.
const T0_MS: i64 = 1_700_000_000_000;
/// Readings are 10 ms apart: 100 per one-second window.
const STEP_MS: i64 = 10;
/// Three full windows, and one reading that closes the third.
const N: i64 = 301;

fn value(i: i64) -> f64 {
    ((i * 37) % 101) as f64
}

fn payload(i: i64) -> String {
    format!("{{\"value\":{},\"ts\":{}}}", value(i), T0_MS + i * STEP_MS)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The emulator and the cross sysroot for `arch`, and the device binary, if all exist.
fn emulated(test: &str, arch: &str, triple: &str, qemu: &str, sysroot: &str) -> Option<(PathBuf, Vec<String>)> {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target").join(triple).join("device/edge-agent");
    if !bin.exists() {
        skip(test, &format!("{} is not built: run `cargo xtask cross {arch}`", bin.display()));
        return None;
    }
    let Some(qemu) =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).map(|d| d.join(qemu)).find(|p| p.exists())
    else {
        skip(test, &format!("{qemu} is not installed: run scripts/cross-deps.sh"));
        return None;
    };
    Some((qemu, vec!["-L".into(), sysroot.into(), bin.display().to_string()]))
}

async fn suite(test: &str, arch: &str, triple: &str, qemu: &str, sysroot: &str) {
    let Some((qemu, pre)) = emulated(test, arch, triple, qemu, sysroot) else { return };
    let broker = Mosquitto::start().unwrap();
    let key = SecretKey::generate();
    let fleet = format!("[fleet]\ntrusted_keys = [{:?}]\nreconcile_interval = \"200ms\"\n", key.public().to_string());
    let hub = Hub::start_with(Path::new(HUB), broker.port, &fleet).await.unwrap();
    let http = reqwest::Client::new();

    // The downsample example in the registry: the hub precompiles it for every target.
    let downsample = std::fs::read(built_module("downsample")).unwrap();
    let resp = http
        .post(format!("{}/api/v1/registry/modules", hub.url))
        .header("Brume-Signature", key.sign(&downsample).to_string())
        .body(downsample.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{}", resp.text().await.unwrap());

    // The threshold example in the agent's own config, precompiled beside it.
    let modules = tempfile::tempdir().unwrap();
    let threshold_path = modules.path().join("threshold.wasm");
    let threshold = std::fs::read(built_module("threshold")).unwrap();
    std::fs::write(&threshold_path, &threshold).unwrap();
    let out = std::process::Command::new(HUB)
        .args(["module", "precompile", "--target", arch])
        .arg(&threshold_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "precompile: {}", String::from_utf8_lossy(&out.stderr));
    assert!(modules.path().join(format!("threshold.{arch}.cwasm")).exists());

    let agent_id = format!("dev-{arch}");
    let mods =
        format!("modules = [{{ path = {:?}, config = {{ limit = 80.0 }} }}]", threshold_path.display().to_string());
    let fleet_cfg = format!("hub_url = {:?}\ntrusted_keys = [{:?}]", hub.url, key.public().to_string());
    let mut agent = Agent::start_with(
        &qemu,
        &pre,
        &agent_id,
        broker.port,
        &[("", &mods), ("fleet", &fleet_cfg), ("module_runtime", "batch_max_readings = 16")],
    )
    .await
    .unwrap();

    // The hub sees the agent's platform and selects by it.
    wait_until("the agent's presence at the hub", Duration::from_secs(60), || async {
        let url = format!("{}/api/v1/presence?label=brume.arch:{arch}&label=brume.build:runtime", hub.url);
        let list: Value = match http.get(&url).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => return false,
        };
        list.as_array().is_some_and(|a| a.iter().any(|x| x["agent_id"] == agent_id.as_str()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    let resp = http
        .post(format!("{}/api/v1/deployments", hub.url))
        .json(&json!({
            "module": "downsample", "version": "0.1.0", "config": {"window_s": 1},
            "selector": {"brume.arch": arch}, "probation": "0s",
        }))
        .send()
        .await
        .unwrap();
    let d: Value = resp.json().await.unwrap();
    let id = d["id"].as_u64().unwrap_or_else(|| panic!("deployment refused: {d}"));
    wait_until("the deployment running on the emulated agent", Duration::from_secs(120), || async {
        let d: Value = match http.get(format!("{}/api/v1/deployments/{id}", hub.url)).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => return false,
        };
        d["state"] == "done" && d["agents"]["running"] == 1
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    assert!(
        agent.dir.path().join(format!("data/fleet/modules/{}.{arch}.cwasm", sha256_hex(&downsample))).exists(),
        "the agent runs the hub's precompiled code"
    );

    // Readings in, with a SIGKILL in the middle.
    let port = agent.mqtt_port;
    let publisher = tokio::spawn(async move { brume_e2e::publish_reliably(port, "sensors/t", 0..N, payload).await });
    wait_until("readings at the hub before the kill", Duration::from_secs(120), || async {
        hub.readings("sensors/t").await.map(|r| r.len() >= 100).unwrap_or(false)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    agent.proc.kill9();
    agent.restart().await.unwrap();
    tokio::time::timeout(Duration::from_secs(300), publisher).await.expect("publisher finished").unwrap();

    wait_until("every reading and result at the hub", Duration::from_secs(180), || async {
        let raw = hub.readings("sensors/t").await.map(|r| r.len()).unwrap_or(0);
        let d = hub.readings("downsampled").await.map(|r| r.len()).unwrap_or(0);
        raw >= N as usize && d >= 3 && agent.drained().await
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));

    // Every reading is there. The one in flight at the kill may be there twice: committed,
    // its PUBACK lost, published again by a sensor on a new clean session (MQTT QoS 1 is
    // at least once; a persistent session would let the agent drop the re-send).
    let raw = hub.readings("sensors/t").await.unwrap();
    let mut ts: Vec<i64> = raw.iter().map(|r| r["ts_ns"].as_i64().unwrap()).collect();
    ts.sort();
    let dup: Vec<i64> = ts.windows(2).filter(|w| w[0] == w[1]).map(|w| (w[0] / 1_000_000 - T0_MS) / STEP_MS).collect();
    ts.dedup();
    let want_ts: Vec<i64> = (0..N).map(|i| (T0_MS + i * STEP_MS) * 1_000_000).collect();
    assert_eq!(ts, want_ts, "every reading");
    assert!(dup.len() <= 1, "readings stored twice: {dup:?}");

    // The modules' outputs are exactly what an uninterrupted run computes over the input
    // the agent stored, in its order: nothing lost, nothing twice across the kill.
    let input = arrival_order(&raw);
    let alerts_want: Vec<(i64, f64)> = input.iter().copied().filter(|(_, v)| *v > 80.0).collect();
    let windows_want = model_downsample(&input, 1_000_000_000);
    assert_eq!(windows_want.len(), 3);
    wait_until("every result at the hub", Duration::from_secs(60), || async {
        let a = hub.readings("alerts/threshold").await.map(|r| r.len()).unwrap_or(0);
        a >= alerts_want.len()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    let alerts = hub.readings("alerts/threshold").await.unwrap();
    let mut got: Vec<(i64, f64)> =
        alerts.iter().map(|r| (r["ts_ns"].as_i64().unwrap(), r["fields"]["value"].as_f64().unwrap())).collect();
    got.sort_by_key(|g| g.0);
    let mut alerts_want = alerts_want;
    alerts_want.sort_by_key(|g| g.0);
    assert_eq!(got, alerts_want, "every alert once");
    assert!(alerts.iter().all(|r| r["module"]["sha256"] == sha256_hex(&threshold)), "threshold lineage");
    let down = hub.readings("downsampled").await.unwrap();
    assert_eq!(windows(&down), windows_want, "every window as an uninterrupted run computes it");
    assert!(down.iter().all(|r| r["module"]["sha256"] == sha256_hex(&downsample)), "downsample lineage");
    agent.proc.terminate();
}

/// aarch64 (Raspberry Pi 3/4/5 with a 64-bit OS): modules as native aarch64 code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_under_qemu() {
    suite("aarch64_agent_under_qemu", "aarch64", "aarch64-unknown-linux-gnu", "qemu-aarch64", "/usr/aarch64-linux-gnu")
        .await;
}

/// armv7 (32-bit Raspberry Pi OS): no Cranelift backend, modules run on Pulley.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_agent_under_qemu_runs_modules_on_pulley() {
    suite(
        "armv7_agent_under_qemu_runs_modules_on_pulley",
        "armv7",
        "armv7-unknown-linux-gnueabihf",
        "qemu-arm",
        "/usr/arm-linux-gnueabihf",
    )
    .await;
}

/// Under systemd (`Type=notify`, `WatchdogSec=`, as the packaged unit runs it) the agent
/// says READY=1 once it serves, pings WATCHDOG=1 every half period, and says STOPPING=1 on
/// SIGTERM. The notification socket is a datagram socket this test binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_notifies_systemd_ready_watchdog_and_stopping() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let pre = vec![
        format!("NOTIFY_SOCKET={}", sock_path.display()),
        "WATCHDOG_USEC=400000".to_string(),
        env!("CARGO_BIN_EXE_e2e-edge-agent").to_string(),
    ];
    let mut agent = Agent::start_with(Path::new("/usr/bin/env"), &pre, "sd-1", broker.port, &[]).await.unwrap();
    fn next(sock: &std::os::unix::net::UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no notification within 30 s: {e}"));
        String::from_utf8_lossy(&buf[..n]).trim().to_owned()
    }
    assert_eq!(next(&sock), "READY=1");
    for _ in 0..3 {
        assert_eq!(next(&sock), "WATCHDOG=1", "pings every 200 ms");
    }
    // Pings may still come before the SIGTERM is handled.
    let stopper = std::thread::spawn(move || std::iter::repeat_with(|| next(&sock)).find(|m| m != "WATCHDOG=1"));
    assert!(agent.proc.terminate().is_some_and(|s| s.success()), "clean exit\n{}", agent.log());
    assert_eq!(stopper.join().unwrap().as_deref(), Some("STOPPING=1"));
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `.deb` of each ARM target (`cargo xtask package aarch64 armv7`): its control data,
/// its files with their modes, a conffile for the config, the agent built for the right
/// machine, a systemd unit with the watchdog and the sandbox, and a config the agent
/// accepts.
#[test]
fn packages_hold_the_agent_its_unit_and_its_config() {
    let test = "packages_hold_the_agent_its_unit_and_its_config";
    let version = env!("CARGO_PKG_VERSION");
    for (arch, machine) in [("arm64", "AArch64"), ("armhf", "ARM")] {
        let deb = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/deb")
            .join(format!("brume-edge-agent_{version}_{arch}.deb"));
        if !deb.exists() {
            skip(test, &format!("{} is not built: run `cargo xtask package aarch64 armv7`", deb.display()));
            return;
        }
        let deb = deb.display().to_string();
        let info = run("dpkg-deb", &["--info", &deb]);
        for want in [
            "Package: brume-edge-agent".to_string(),
            format!("Version: {version}"),
            format!("Architecture: {arch}"),
            "Depends: libc6 (>= 2.".to_string(),
            "postinst".to_string(),
            "prerm".to_string(),
            "postrm".to_string(),
            "conffiles".to_string(),
        ] {
            assert!(info.contains(&want), "{arch}: no {want:?} in\n{info}");
        }
        let contents = run("dpkg-deb", &["--contents", &deb]);
        for (mode, path) in [
            ("-rwxr-xr-x root/root", "./usr/bin/edge-agent"),
            ("-rw-r--r-- root/root", "./lib/systemd/system/edge-agent.service"),
            ("-rw-r----- root/root", "./etc/brume/edge-agent.toml"),
            ("-rw-r--r-- root/root", "./usr/share/doc/brume-edge-agent/config.example.toml"),
            ("-rw-r--r-- root/root", "./usr/share/doc/brume-edge-agent/copyright"),
        ] {
            assert!(
                contents.lines().any(|l| l.starts_with(mode) && l.ends_with(path)),
                "{arch}: no {path} with {mode} in\n{contents}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        run("dpkg-deb", &["--extract", &deb, &root]);
        let ctrl = dir.path().join("DEBIAN");
        run("dpkg-deb", &["--control", &deb, &ctrl.display().to_string()]);
        assert_eq!(std::fs::read_to_string(ctrl.join("conffiles")).unwrap(), "/etc/brume/edge-agent.toml\n");
        let elf = run("readelf", &["-h", &dir.path().join("usr/bin/edge-agent").display().to_string()]);
        assert!(elf.lines().any(|l| l.contains("Machine:") && l.trim_end().ends_with(machine)), "{arch}:\n{elf}");
        let unit = std::fs::read_to_string(dir.path().join("lib/systemd/system/edge-agent.service")).unwrap();
        for want in [
            "Type=notify",
            "WatchdogSec=",
            "Restart=on-failure",
            "User=brume",
            "StateDirectory=brume",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=\n",
            "ExecStart=/usr/bin/edge-agent --config /etc/brume/edge-agent.toml",
        ] {
            assert!(unit.contains(want), "{arch}: the unit lacks {want:?}");
        }
        // The packaged config is one the agent accepts, and keeps its data where the
        // unit's StateDirectory is.
        let cfg = dir.path().join("etc/brume/edge-agent.toml").display().to_string();
        let printed = run(env!("CARGO_BIN_EXE_e2e-edge-agent"), &["--config", &cfg, "--print-config"]);
        assert!(printed.contains("data_dir = \"/var/lib/brume\""), "{printed}");
    }
}
