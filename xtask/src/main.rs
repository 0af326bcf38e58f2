//! Brume developer tasks.
//!
//! `cargo xtask bench [--quick] [--write] [--only mqtt,store,rss,wasm,hub,hubscale,hubquery,edgecost,rollout,device,dashboard]` runs the benchmarks and
//! prints a Markdown table; `--write` also rewrites `BENCHMARKS.md` at the repository root.
//! Benchmarks print; nothing here asserts a timing.
//!
//! `cargo xtask build-modules` builds the example WASM modules (`modules/examples`) for
//! wasm32-unknown-unknown, checks them against the module ABI and copies them to
//! `target/modules/` (see `modules.rs`).
//!
//! `cargo xtask cross aarch64|armv7|x86_64 [--jit]` builds the agent for devices (see
//! `cross.rs`); `cargo xtask package aarch64|armv7|x86_64` makes a `.deb` of it (see
//! `package.rs`).

mod cross;
mod dashboard;
mod device;
mod edgecost;
mod hub;
mod hubquery;
mod hubscale;
mod modules;
mod mqtt;
mod package;
mod rollout;
mod rss;
mod store;
mod swap;
mod util;
mod wasm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edge_agent::config::Durability;

use crate::util::{Machine, Samples, fmt_bytes, group};

#[derive(Parser)]
#[command(about = "Brume developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmarks and print a Markdown table.
    Bench {
        /// Also rewrite BENCHMARKS.md at the repository root.
        #[arg(long)]
        write: bool,
        /// Smaller N and a 10 s RSS run: a smoke check, not a measurement.
        #[arg(long)]
        quick: bool,
        /// Run only these groups (mqtt, store, rss, wasm, hub, hubscale, hubquery, edgecost, rollout, device, dashboard); cannot be combined with --write.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Samples per short benchmark (median [min..max] is reported).
        #[arg(long, default_value_t = 3)]
        samples: usize,
        /// edgecost: only these steady rates (readings/s; 100, 1000, 10000, and 0 for the
        /// idle row), e.g. to compare a change quickly; cannot be combined with --write.
        #[arg(long, value_delimiter = ',')]
        rates: Vec<u32>,
    },
    /// Build the example WASM modules (release, wasm32-unknown-unknown), check each against
    /// the module ABI, and copy them to target/modules/.
    BuildModules,
    /// Build the agent for devices (aarch64, armv7, x86_64) with the `device` profile,
    /// installing the cross toolchains when missing; prints each binary's size against
    /// its budget. Runtime-only unless --jit.
    Cross {
        /// Targets: aarch64, armv7, x86_64.
        #[arg(required = true)]
        targets: Vec<String>,
        /// The agent that compiles modules itself (Cranelift; not on armv7).
        #[arg(long)]
        jit: bool,
    },
    /// Build a .deb of the agent per target (runtime-only, device profile): binary,
    /// systemd unit, config, docs, maintainer scripts; into target/deb/.
    Package {
        /// Targets: aarch64, armv7, x86_64.
        #[arg(required = true)]
        targets: Vec<String>,
    },
}

/// Notes below this line in BENCHMARKS.md survive `--write`.
const KEEP_MARKER: &str =
    "<!-- Everything below this line is hand-written and kept by `cargo xtask bench --write`. -->";

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf();
    match Cli::parse().cmd {
        Cmd::Bench { write, quick, only, samples, rates } => bench(&root, write, quick, only, samples, rates),
        Cmd::BuildModules => modules::build(&root),
        Cmd::Cross { targets, jit } => cross::run(&root, &targets, jit),
        Cmd::Package { targets } => package::run(&root, &targets),
    }
}

fn bench(root: &Path, write: bool, quick: bool, only: Vec<String>, samples: usize, rates: Vec<u32>) -> Result<()> {
    for o in &only {
        if ![
            "mqtt",
            "store",
            "rss",
            "wasm",
            "hub",
            "hubscale",
            "hubquery",
            "edgecost",
            "rollout",
            "device",
            "dashboard",
        ]
        .contains(&o.as_str())
        {
            bail!(
                "--only takes mqtt, store, rss, wasm, hub, hubscale, hubquery, edgecost, rollout, device, dashboard; got {o:?}"
            );
        }
    }
    if write && (!only.is_empty() || !rates.is_empty()) {
        bail!("--write needs the full run; drop --only and --rates");
    }
    if let Some(r) = rates.iter().find(|r| ![0, 100, 1000, 10_000].contains(*r)) {
        bail!("--rates takes 0, 100, 1000, 10000; got {r}");
    }
    if samples == 0 {
        bail!("--samples must be at least 1");
    }
    let runs = |g: &str| only.is_empty() || only.iter().any(|o| o == g);
    let p = Params::new(quick, samples);
    let machine = Machine::probe();
    let started = Instant::now();

    // Build first, so the compiler does not compete with the measurements.
    if runs("wasm") || runs("rss") || runs("rollout") || runs("device") {
        modules::build(root)?;
    }
    let hub_exe = if ["hubscale", "hubquery", "edgecost", "rollout", "device", "dashboard"].into_iter().any(runs) {
        Some(hubscale::build_hub(root)?)
    } else {
        None
    };
    let exe = if runs("rss") || runs("edgecost") || runs("rollout") { Some(rss::build_agent(root)?) } else { None };

    let mut rows = Vec::new();
    if runs("mqtt") {
        rows.extend(bench_mqtt(&p)?);
    }
    if runs("store") {
        rows.extend(bench_store(&p)?);
    }
    if let Some(exe) = &exe
        && runs("rss")
    {
        rows.extend(bench_rss(&p, root, exe)?);
    }
    if runs("wasm") {
        rows.extend(bench_wasm(&p, root)?);
    }
    if runs("hub") {
        rows.extend(bench_hub(&p)?);
    }
    if let Some(hub_exe) = &hub_exe {
        if runs("hubscale") {
            rows.extend(bench_hubscale(&p, hub_exe)?);
        }
        if runs("hubquery") {
            rows.push(bench_hubquery(&p, hub_exe)?);
        }
        if let Some(exe) = &exe
            && runs("edgecost")
        {
            rows.extend(bench_edgecost(&p, exe, hub_exe, &rates)?);
        }
        if runs("rollout") {
            rows.extend(bench_rollout(&p, root, hub_exe, exe.as_deref().context("the agent binary")?)?);
        }
        if runs("device") {
            rows.extend(bench_device(root, hub_exe)?);
        }
        if runs("dashboard") {
            rows.extend(bench_dashboard(hub_exe)?);
        }
    }
    let total = started.elapsed().as_secs_f64();

    let mut command = String::from("cargo xtask bench");
    if quick {
        command.push_str(" --quick");
    }
    if samples != 3 {
        command.push_str(&format!(" --samples {samples}"));
    }
    if write {
        command.push_str(" --write");
    }
    let table = render_table(&rows);
    println!("{table}");
    eprintln!("total run time {total:.0} s");
    if write {
        let path = root.join("BENCHMARKS.md");
        let kept = std::fs::read_to_string(&path)
            .ok()
            .and_then(|old| old.split_once(KEEP_MARKER).map(|(_, rest)| rest.trim_start_matches('\n').to_string()))
            .unwrap_or_default();
        let doc = render_doc(&machine, &command, &p, &table, &rows, total, &kept);
        std::fs::write(&path, doc)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn bench_device(root: &Path, hub: &Path) -> Result<Vec<Row>> {
    eprintln!("9. the agent on devices: stripped sizes, Pulley's cost under qemu, runtime-only vs JIT");
    cross::ensure_toolchains(root, &cross::DEVICES)?;
    let mb = |b: u64| format!("{:.2} MB", b as f64 / 1e6);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).with_context(|| format!("{}", p.display()));
    let mut rows = Vec::new();
    let mut runtime = std::collections::HashMap::new();
    for (id, d) in [("9a", cross::DEVICES[0]), ("9b", cross::DEVICES[1]), ("9c", cross::DEVICES[2])] {
        let bin = cross::build(root, d, false)?;
        let bytes = size(&bin)?;
        let jit = if d.name == "armv7" {
            "no JIT build: Cranelift has no 32-bit ARM backend".to_string()
        } else {
            let j = size(&cross::build(root, d, true)?)?;
            format!("the JIT build (`--jit`, Cranelift) is {} ({:.1}×)", mb(j), j as f64 / bytes as f64)
        };
        eprintln!("  {:<8} runtime-only {}; {jit}", d.name, mb(bytes));
        rows.push(Row {
            id,
            name: format!("edge-agent for {} ({}), runtime-only, `device` profile, stripped", d.name, d.triple),
            result: mb(bytes),
            limit: "–".into(),
            ratio: "–".into(),
            target: format!("≤ {:.0} MB", d.budget as f64 / 1e6),
            verdict: if bytes <= d.budget { "meets".into() } else { "**misses**".into() },
            note: format!("`cargo xtask cross {}`; {jit}.", d.name),
        });
        runtime.insert(d.name, bin);
    }

    // Pulley against native code, both emulated.
    let qemu = |arch: &str, bin: &Path| -> Vec<String> {
        let (q, sysroot) = if arch == "aarch64" {
            ("qemu-aarch64", "/usr/aarch64-linux-gnu")
        } else {
            ("qemu-arm", "/usr/arm-linux-gnueabihf")
        };
        vec![q.into(), "-L".into(), sysroot.into(), bin.display().to_string()]
    };
    let mut emulated = Vec::new();
    for arch in ["aarch64", "armv7"] {
        let (_dir, wasm) = device::module_dir(root, hub, Some(arch))?;
        let r = device::module_run(&qemu(arch, &runtime[arch]), &wasm)?;
        eprintln!(
            "  {arch:<8} under qemu: module loaded after {:.2} s, {:.2} µs CPU per reading",
            r.load_secs, r.cpu_us_per_reading
        );
        emulated.push(r);
    }
    // The JIT build under emulation: it compiles in a child process of itself, which
    // qemu-user without binfmt_misc may not be able to start; reported either way.
    let jit_a64 = cross::build(root, cross::DEVICES[0], true)?;
    let (_dj, plain_a64) = device::module_dir(root, hub, None)?;
    let jit_emulated = match device::module_run(&qemu("aarch64", &jit_a64), &plain_a64) {
        Ok(r) => format!(
            "The aarch64 JIT build under the same emulator: module loaded after {:.2} s (it compiles first), {:.1} µs per reading.",
            r.load_secs, r.cpu_us_per_reading
        ),
        Err(e) => format!("The aarch64 JIT build could not be measured under qemu-user: {e:#}."),
    };
    eprintln!("  {jit_emulated}");
    rows.push(Row {
        id: "9d",
        name: format!(
            "threshold module over {} stored readings, agent CPU per reading: armv7 (Pulley) vs aarch64 (native code), both under qemu-user",
            group(device::READINGS as f64)
        ),
        result: format!("{:.1}× aarch64's", emulated[1].cpu_us_per_reading / emulated[0].cpu_us_per_reading),
        limit: "–".into(),
        ratio: "–".into(),
        target: "–".into(),
        verdict: "–".into(),
        note: format!(
            "Runtime-only device builds, modules precompiled by the hub's `module precompile`; the agent process's CPU from module loaded to every reading in (module calls and their output commits). Under emulation: aarch64 {:.1} µs, armv7 {:.1} µs per reading; only the ratio means something, and it includes qemu-arm's and qemu-aarch64's different emulation costs. Start to module loaded: aarch64 {:.2} s, armv7 {:.2} s. {jit_emulated}",
            emulated[0].cpu_us_per_reading, emulated[1].cpu_us_per_reading, emulated[0].load_secs, emulated[1].load_secs
        ),
    });

    // Runtime-only against JIT on this machine, natively.
    let x86 = cross::DEVICES[2];
    let jit_bin = cross::build(root, x86, true)?;
    let (_d1, pre) = device::module_dir(root, hub, Some("x86_64"))?;
    let rt = device::module_run(&[runtime["x86_64"].display().to_string()], &pre)?;
    let (_d2, plain) = device::module_dir(root, hub, None)?;
    let jit = device::module_run(&[jit_bin.display().to_string()], &plain)?;
    eprintln!(
        "  x86_64 runtime-only: loaded after {:.3} s, {:.2} µs/reading, RSS {}; JIT: {:.3} s, {:.2} µs/reading, RSS {}",
        rt.load_secs,
        rt.cpu_us_per_reading,
        fmt_bytes(rt.rss as f64),
        jit.load_secs,
        jit.cpu_us_per_reading,
        fmt_bytes(jit.rss as f64)
    );
    rows.push(Row {
        id: "9e",
        name: "x86_64 device builds, natively: runtime-only (precompiled module) vs JIT (compiles it in a child process)"
            .into(),
        result: format!(
            "start → module loaded {:.0} ms vs {:.0} ms; RSS {} vs {}",
            1e3 * rt.load_secs,
            1e3 * jit.load_secs,
            fmt_bytes(rt.rss as f64),
            fmt_bytes(jit.rss as f64)
        ),
        limit: "–".into(),
        ratio: "–".into(),
        target: "–".into(),
        verdict: "–".into(),
        note: format!(
            "The threshold example over {} stored readings, first start (the JIT agent has no compiled cache yet). CPU per reading while processing: runtime-only {:.2} µs, JIT {:.2} µs (the JIT compiles for this CPU's features, the hub for the architecture's baseline). RSS at the end of the run.",
            group(device::READINGS as f64),
            rt.cpu_us_per_reading,
            jit.cpu_us_per_reading
        ),
    });
    Ok(rows)
}

/// Sizes of the run.
struct Params {
    quick: bool,
    samples: usize,
    mqtt_n: usize,
    store_n: usize,
    rss_secs: u64,
    rss_rate: u32,
    wasm_batches: usize,
    pipeline_n: usize,
    hub_days: i64,
    scale_batches: u64,
    /// Batches of 1,000 readings preloaded for the query benchmark (6c).
    query_batches: u64,
}

impl Params {
    fn new(quick: bool, samples: usize) -> Params {
        Params {
            quick,
            samples,
            mqtt_n: if quick { 10_000 } else { 100_000 },
            store_n: if quick { 100_000 } else { 1_000_000 },
            rss_secs: if quick { 10 } else { 60 },
            rss_rate: 1000,
            wasm_batches: if quick { 200 } else { 2000 },
            pipeline_n: if quick { 100_000 } else { 1_000_000 },
            hub_days: if quick { 3 } else { 30 },
            scale_batches: if quick { 10 } else { 100 },
            query_batches: if quick { 100 } else { 1000 },
        }
    }
}

/// One line of the results table.
struct Row {
    id: &'static str,
    name: String,
    result: String,
    limit: String,
    ratio: String,
    target: String,
    verdict: String,
    note: String,
}

fn pct(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() { format!("{:.0} %", 100.0 * a / b) } else { "–".into() }
}

fn at_least(v: f64, target: f64) -> String {
    if v >= target { "meets".into() } else { format!("**misses** ({:.0} % of target)", 100.0 * v / target) }
}

fn progress(what: &str, v: f64) {
    eprintln!("  {what:<44} {:>12}/s", group(v));
}

fn bench_mqtt(p: &Params) -> Result<Vec<Row>> {
    eprintln!("1. MQTT ingest, N = {} per sample, {} samples", group(p.mqtt_n as f64), p.samples);
    let mosq = util::Mosquitto::start()?;
    let (mut full, mut fast, mut broker) = (Samples::default(), Samples::default(), Samples::default());
    // Interleaved, so drift (thermal, page cache, noisy neighbours) hits every variant alike.
    for i in 0..p.samples {
        let v = mqtt::agent_rate(p.mqtt_n, Durability::Full)?;
        progress("agent, durability = full", v);
        full.push(v);
        let v = mqtt::agent_rate(p.mqtt_n, Durability::Fast)?;
        progress("agent, durability = fast", v);
        fast.push(v);
        let v = mqtt::publish_rate(mosq.port, p.mqtt_n, &format!("bench-mosquitto-{i}"))?;
        progress("mosquitto, persistence false", v);
        broker.push(v);
    }
    drop(mosq);
    let target = 30_000.0;
    let limit = format!("mosquitto: {}", broker.fmt_rate());
    Ok(vec![
        Row {
            id: "1a",
            name: "MQTT ingest, 1 reading/PUBLISH, QoS 1, 100 in flight, PUBACK after fsync (durability = full)".into(),
            result: full.fmt_rate(),
            limit: limit.clone(),
            ratio: pct(full.median(), broker.median()),
            target: "≥ 30,000/s".into(),
            verdict: at_least(full.median(), target),
            note: "Every PUBACK waits for a group commit with fsync; up to 100 PUBLISHes share one. \
                   mosquitto only keeps the message in memory and acks at once."
                .into(),
        },
        Row {
            id: "1b",
            name: "MQTT ingest, same, durability = fast (no fsync)".into(),
            result: fast.fmt_rate(),
            limit,
            ratio: pct(fast.median(), broker.median()),
            target: "≥ 30,000/s".into(),
            verdict: at_least(fast.median(), target),
            note: format!(
                "1b − 1a is the fsync cost ({} of full's rate). 1b vs mosquitto is JSON parsing, SQLite and \
                 the per-connection commit pipeline.",
                pct(fast.median() - full.median(), full.median())
            ),
        },
    ])
}

fn bench_store(p: &Params) -> Result<Vec<Row>> {
    eprintln!("2. batched ingest → store → outbox, N = {} per sample, {} samples", group(p.store_n as f64), p.samples);
    let t = Instant::now();
    let input = store::Input::generate(p.store_n);
    eprintln!(
        "  generated {} readings ({:.1} B fields blob on average) in {:.1} s",
        group(p.store_n as f64),
        input.mean_blob(),
        t.elapsed().as_secs_f64()
    );
    let mut s: [Samples; 8] = Default::default();
    let names = [
        "Store::apply, full",
        "Store::apply, fast",
        "StoreHandle::append ×4 tasks, full",
        "StoreHandle::append ×4 tasks, fast",
        "raw SQLite 10,000 rows/tx, NORMAL",
        "raw SQLite 1,000 rows/tx, NORMAL",
        "raw SQLite 1,000 rows/tx, FULL",
        "raw SQLite 1,000 rows/tx, NORMAL, + index",
    ];
    for _ in 0..p.samples {
        for (k, name) in names.iter().enumerate() {
            let v = match k {
                0 => store::apply_rate(&input, Durability::Full)?,
                1 => store::apply_rate(&input, Durability::Fast)?,
                2 => store::handle_rate(&input, Durability::Full, 4)?,
                3 => store::handle_rate(&input, Durability::Fast, 4)?,
                4 => store::raw_rate(&input, 10_000, "NORMAL", false)?,
                5 => store::raw_rate(&input, 1_000, "NORMAL", false)?,
                6 => store::raw_rate(&input, 1_000, "FULL", false)?,
                _ => store::raw_rate(&input, 1_000, "NORMAL", true)?,
            };
            progress(name, v);
            s[k].push(v);
        }
    }
    let ceiling = &s[4];
    let limit = format!("raw SQLite 10k rows/tx: {}", ceiling.fmt_rate());
    let target = 1_000_000.0;
    let store_row = |id, name: &str, k: usize, note: String| Row {
        id,
        name: name.into(),
        result: s[k].fmt_rate(),
        limit: limit.clone(),
        ratio: pct(s[k].median(), ceiling.median()),
        target: "≥ 1,000,000/s".into(),
        verdict: at_least(s[k].median(), target),
        note,
    };
    let raw_row = |id, name: &str, k: usize, note: String| Row {
        id,
        name: name.into(),
        result: s[k].fmt_rate(),
        limit: if k == 4 { "–".into() } else { limit.clone() },
        ratio: if k == 4 { "–".into() } else { pct(s[k].median(), ceiling.median()) },
        target: "reference".into(),
        verdict: "–".into(),
        note,
    };
    Ok(vec![
        store_row(
            "2a",
            "Store::apply, 1,000 readings per transaction, durability = full",
            0,
            format!(
                "One commit per 1,000 readings with fsync, plus what raw SQLite does not do: the per-stream bucket \
                 directory, per-stream counters, meta and one outbox row per commit. Same-granularity raw SQLite with \
                 fsync (2g): {} ({} of it).",
                s[6].fmt_rate(),
                pct(s[0].median(), s[6].median())
            ),
        ),
        store_row(
            "2b",
            "Store::apply, 1,000 readings per transaction, durability = fast",
            1,
            format!(
                "No fsync. Same-granularity raw SQLite (2f): {} ({} of it); with a (stream, ts) index, which the store avoids \
                 (2h): {} ({} of it). What 2h does not explain is the store's own per-reading and per-commit work.",
                s[5].fmt_rate(),
                pct(s[1].median(), s[5].median()),
                s[7].fmt_rate(),
                pct(s[1].median(), s[7].median())
            ),
        ),
        store_row(
            "2c",
            "StoreHandle::append from 4 tasks, 1,000 readings each, durability = full, commit_window = 0",
            2,
            format!(
                "The writer thread merges the queued appends (≤ 4 groups here) into one commit; {} of 2a.",
                pct(s[2].median(), s[0].median())
            ),
        ),
        store_row(
            "2d",
            "StoreHandle::append from 4 tasks, 1,000 readings each, durability = fast, commit_window = 0",
            3,
            format!("{} of 2b: channel, oneshot and task hand-offs on top of Store::apply.", pct(s[3].median(), s[1].median())),
        ),
        raw_row(
            "2e",
            "raw SQLite ceiling: WAL, synchronous=NORMAL, 10,000 rows/tx, no index",
            4,
            "Prepared INSERT into t(id INTEGER PRIMARY KEY, stream, ts, fields) of the same blobs; fresh file per sample.".into(),
        ),
        raw_row("2f", "raw SQLite, WAL, synchronous=NORMAL, 1,000 rows/tx", 5, "Same, at the store's transaction size.".into()),
        raw_row(
            "2g",
            "raw SQLite, WAL, synchronous=FULL, 1,000 rows/tx",
            6,
            "Same with an fsync per commit: the like-for-like bound for 2a.".into(),
        ),
        raw_row(
            "2h",
            "raw SQLite, WAL, synchronous=NORMAL, 1,000 rows/tx, + index on (stream, ts)",
            7,
            "2f plus a secondary (stream, ts) index, which the store had before its bucket directory (100 interleaved streams): what such an index costs.".into(),
        ),
    ])
}

fn bench_rss(p: &Params, root: &Path, exe: &Path) -> Result<Vec<Row>> {
    eprintln!("3. agent RSS at {} readings/s for {} s", p.rss_rate, p.rss_secs);
    let size = std::fs::metadata(exe)?.len();
    let r = rss::run(exe, p.rss_secs, p.rss_rate, "")?;
    eprintln!(
        "  VmHWM {}, VmRSS {} at the end; {} readings, {} unacked batches; {} batch publishes seen at the broker",
        fmt_bytes(r.hwm as f64),
        fmt_bytes(r.rss_end as f64),
        group(r.readings as f64),
        r.outbox_batches,
        r.broker_msgs
    );
    let target = 15e6;
    Ok(vec![
        Row {
            id: "3a",
            name: format!(
                "edge-agent process, --simulate {}, hub mode with no hub (outbox never acked), {:.0} s",
                p.rss_rate, r.secs
            ),
            result: format!("VmHWM {}", fmt_bytes(r.hwm as f64)),
            limit: format!("mosquitto VmHWM: {}", fmt_bytes(r.mosquitto_hwm as f64)),
            ratio: "–".into(),
            target: "≤ 15 MB".into(),
            verdict: if (r.hwm as f64) <= target {
                "meets".into()
            } else {
                format!("**misses** ({:.0} % of target)", 100.0 * r.hwm as f64 / target)
            },
            note: format!(
                "Worst case for memory: nothing is ever acknowledged, so the outbox only grows ({} batches, {} readings \
                 at the end) and unacked batches are re-sent after ack_timeout ({} batch publishes, {:.1} MB reached \
                 the broker). VmRSS {} at the end, {} at most (1 s samples).",
                r.outbox_batches,
                group(r.readings as f64),
                r.broker_msgs,
                r.broker_bytes as f64 / 1e6,
                fmt_bytes(r.rss_end as f64),
                fmt_bytes(r.rss_max as f64)
            ),
        },
        modules_rss_row(p, root, exe)?,
        Row {
            id: "3b",
            name: "edge-agent release binary size (strip = true, lto = thin)".into(),
            result: format!("{} B = {}", group(size as f64), fmt_bytes(size as f64)),
            limit: "–".into(),
            ratio: "–".into(),
            target: "–".into(),
            verdict: "–".into(),
            note: format!("`ls -l {}`; x86_64, workspace release profile.", rel(exe)),
        },
    ])
}

fn modules_rss_row(p: &Params, root: &Path, exe: &Path) -> Result<Row> {
    let r = rss::run(exe, p.rss_secs, p.rss_rate, &rss::five_modules(root))?;
    eprintln!(
        "  with 5 modules: VmHWM {}, VmRSS {} at the end; {} readings of which {} module outputs",
        fmt_bytes(r.hwm as f64),
        fmt_bytes(r.rss_end as f64),
        group(r.readings as f64),
        group(r.module_outputs as f64)
    );
    if r.module_outputs == 0 {
        bail!("the five modules wrote nothing: the RSS run with modules did not exercise them");
    }
    let target = 20e6;
    Ok(Row {
        id: "3c",
        name: format!(
            "edge-agent process as 3a plus the five example WASM modules on every simulated stream, {:.0} s",
            r.secs
        ),
        result: format!("VmHWM {}", fmt_bytes(r.hwm as f64)),
        limit: "–".into(),
        ratio: "–".into(),
        target: "≤ 20 MB".into(),
        verdict: if (r.hwm as f64) <= target {
            "meets".into()
        } else {
            format!("**misses** ({:.0} % of target)", 100.0 * r.hwm as f64 / target)
        },
        note: format!(
            "threshold, deadband, downsample, zscore (history query per reading), unit-convert: one engine, a \
             store each, all on one thread (module_runtime.threads = 1, the default); {} of the {} stored readings are module outputs. VmRSS {} at the end, {} at \
             most.",
            group(r.module_outputs as f64),
            group(r.readings as f64),
            fmt_bytes(r.rss_end as f64),
            fmt_bytes(r.rss_max as f64)
        ),
    })
}

fn bench_wasm(p: &Params, root: &Path) -> Result<Vec<Row>> {
    eprintln!(
        "4. WASM modules: {} batches of {} readings per sample, {} samples; pipeline over {} readings",
        group(p.wasm_batches as f64),
        wasm::BATCH,
        p.samples,
        group(p.pipeline_n as f64)
    );
    let c = wasm::calls(root, p.wasm_batches, p.samples)?;
    progress("native threshold (median)", c.native.median());
    progress("wasm threshold (median)", c.wasm.median());
    let mut pipe = Samples::default();
    let mut outputs = 0;
    for _ in 0..p.samples {
        let r = wasm::pipeline(root, p.pipeline_n)?;
        let v = r.readings as f64 / r.secs;
        progress("module pipeline", v);
        pipe.push(v);
        outputs = r.outputs;
    }
    let us = |s: &Samples| format!("{:.1} µs [{:.1}..{:.1}]", s.median() * 1e6, s.min() * 1e6, s.max() * 1e6);
    let ratio = c.wasm.median() / c.native.median();
    Ok(vec![
        Row {
            id: "4a",
            name: format!("threshold module, {} readings per call, through the agent's host (fuel + epochs)", wasm::BATCH),
            result: c.wasm.fmt_rate(),
            limit: format!("same filter native: {}", c.native.fmt_rate()),
            ratio: pct(c.wasm.median(), c.native.median()),
            target: "≥ 50 % of native (≤ 2× slower)".into(),
            verdict: at_least(ratio, 0.5),
            note: format!(
                "Both sides encode the input and decode the output with postcard through the SDK runtime; the difference is \
                 WASM: copy-in, Cranelift code with fuel and epoch checks, copy-out. {} of {} readings pass per batch; \
                 {} fuel per batch ({:.0} per reading).",
                c.outputs_per_batch,
                wasm::BATCH,
                group(c.fuel_per_batch as f64),
                c.fuel_per_batch as f64 / wasm::BATCH as f64
            ),
        },
        Row {
            id: "4b",
            name: "instantiate + brume_init (threshold)".into(),
            result: us(&c.instantiate),
            limit: "–".into(),
            ratio: "–".into(),
            target: "–".into(),
            verdict: "–".into(),
            note: "A fresh Store, instance and init call: what re-instantiating a poisoned module costs.".into(),
        },
        Row {
            id: "4c",
            name: "empty call (0 readings) through the host".into(),
            result: us(&c.empty_call),
            limit: "–".into(),
            ratio: "–".into(),
            target: "–".into(),
            verdict: "–".into(),
            note: "Fixed cost per batch: fuel and deadline set-up, encode, alloc, call, decode.".into(),
        },
        Row {
            id: "4d",
            name: format!("compile threshold.wasm ({} B), Cranelift, once per file", group(c.module_bytes as f64)),
            result: format!("{:.0} ms", c.compile.as_secs_f64() * 1e3),
            limit: "–".into(),
            ratio: "–".into(),
            target: "–".into(),
            verdict: "–".into(),
            note: "Paid once per module build, in a child process of the agent (edge-agent compile-module); the machine code is \
                   cached in data_dir/module-cache, so restarts and rollbacks load it without compiling."
                .into(),
        },
        Row {
            id: "4e",
            name: format!(
                "module pipeline: store → threshold → commit, {} readings on 100 streams, the agent's ModuleRunners",
                group(p.pipeline_n as f64)
            ),
            result: pipe.fmt_rate(),
            limit: format!("host call alone (4a): {}", c.wasm.fmt_rate()),
            ratio: pct(pipe.median(), c.wasm.median()),
            target: "≥ 1,000,000/s".into(),
            verdict: at_least(pipe.median(), 1e6),
            note: format!(
                "Read a batch of 1,000 from SQLite, decode fields, call, commit outputs ({} per run) with the new cursor and \
                 state in one transaction (durability = full). Timed from the module's load to its cursor passing the last reading.",
                group(outputs as f64)
            ),
        },
    ])
}

fn bench_hub(p: &Params) -> Result<Vec<Row>> {
    let batches = hub::batches(p.hub_days);
    let n: usize = batches.iter().map(brume_protocol::Batch::reading_count).sum();
    eprintln!(
        "5. hub stores: {} days of 1 Hz on one stream = {} readings in {} batches of {}, {} batches per transaction, {} samples",
        p.hub_days,
        group(n as f64),
        batches.len(),
        hub::BATCH,
        hub::GROUP,
        p.samples
    );
    let pg = hub::Pg::start();
    let (mut sqlite, mut postgres, mut raw, mut dups) =
        (Samples::default(), Samples::default(), Samples::default(), Samples::default());
    let mut last_sqlite = None;
    let mut last_pg = None;
    for i in 0..p.samples {
        let (dir, store) = hub::sqlite_store()?;
        let v = hub::ingest_rate(&store, &batches)?;
        progress("hub ingest, SQLite", v);
        sqlite.push(v);
        last_sqlite = Some((dir, store));
        let store = pg.store(&format!("hub{i}"))?;
        let v = hub::ingest_rate(&store, &batches)?;
        progress("hub ingest, PostgreSQL", v);
        postgres.push(v);
        let v = hub::duplicate_rate(&store, &batches)?;
        progress("  all again (duplicates), batches", v);
        dups.push(v);
        last_pg = Some(store);
        let v = pg.raw_rate(&format!("raw{i}"), &batches)?;
        progress("raw PostgreSQL COPY BINARY, same table shape", v);
        raw.push(v);
    }
    let ms = |d: &[std::time::Duration]| {
        let mut s = Samples::default();
        for x in d {
            s.push(x.as_secs_f64() * 1e3);
        }
        s
    };
    let (_dir, sqlite_store) = last_sqlite.context("no sample")?;
    let (lat_sqlite, buckets) = hub::query_latencies(&sqlite_store, p.hub_days, 20)?;
    let (lat_pg, _) = hub::query_latencies(last_pg.as_ref().context("no sample")?, p.hub_days, 20)?;
    let (qs, qp) = (ms(&lat_sqlite), ms(&lat_pg));
    let fmt_ms = |s: &Samples| format!("{:.1} ms [{:.1}..{:.1}]", s.median(), s.min(), s.max());
    let raw_limit = format!("raw PostgreSQL: {}", raw.fmt_rate());
    let query_row = |id, backend: &str, s: &Samples| Row {
        id,
        name: format!("aggregate {} days of 1 Hz (one stream) to {buckets} buckets, {backend}", p.hub_days),
        result: fmt_ms(s),
        limit: "–".into(),
        ratio: "–".into(),
        target: "< 100 ms".into(),
        verdict: if s.median() < 100.0 { "meets".into() } else { format!("**misses** ({:.0} ms)", s.median()) },
        note: format!(
            "`cloud_hub::aggregate::aggregate`, median of 20: merges {} one-minute rollup rows into {buckets} buckets of {} min; \
             the raw readings are never read.",
            group((p.hub_days * 1440) as f64),
            hub_step_minutes(p.hub_days)
        ),
    };
    Ok(vec![
        Row {
            id: "5a",
            name: format!(
                "hub ingest into SQLite (default backend), {} readings/batch, {} batches/transaction",
                hub::BATCH,
                hub::GROUP
            ),
            result: sqlite.fmt_rate(),
            limit: "–".into(),
            ratio: "–".into(),
            target: "–".into(),
            verdict: "–".into(),
            note: "`HubStore::ingest` of validated batches: dedup row per batch, readings, stream statistics and one-minute \
                   rollups in one transaction with fsync (synchronous=FULL)."
                .into(),
        },
        Row {
            id: "5b",
            name: "hub ingest into PostgreSQL with dedup, same batches".into(),
            result: postgres.fmt_rate(),
            limit: raw_limit.clone(),
            ratio: pct(postgres.median(), raw.median()),
            target: "≥ 80 % of raw".into(),
            verdict: at_least(postgres.median() / raw.median(), 0.8),
            note: "Batches deduplicated with INSERT … ON CONFLICT DO NOTHING RETURNING, readings by COPY BINARY into daily \
                   partitions, stream-day statistics and rollups upserted, one transaction per group; one connection; \
                   durable server (fsync on). The raw limit (5c) is the same COPY into the same table shape without the \
                   rest: the ratio is what dedup, statistics and rollups cost."
                .into(),
        },
        Row {
            id: "5c",
            name: "raw PostgreSQL: the same rows, COPY BINARY into the same table shape (daily partitions, same index), 10,000 rows/tx".into(),
            result: raw.fmt_rate(),
            limit: "–".into(),
            ratio: "–".into(),
            target: "reference".into(),
            verdict: "–".into(),
            note: "The hub's method with nothing else: no dedup row, no statistics, no rollups; partitions created before \
                   the clock starts; same server, same run."
                .into(),
        },
        Row {
            id: "5d",
            name: "PostgreSQL: every batch re-sent (all duplicates)".into(),
            result: dups.fmt_rate().replacen("/s", " batches/s", 1),
            limit: "–".into(),
            ratio: "–".into(),
            target: "–".into(),
            verdict: "–".into(),
            note: "Lost acks make agents re-send; a duplicate costs one conflicting key, no readings.".into(),
        },
        query_row("5e", "SQLite", &qs),
        query_row("5f", "PostgreSQL", &qp),
    ])
}

fn bench_hubscale(p: &Params, exe: &Path) -> Result<Vec<Row>> {
    eprintln!(
        "6. hub processes end to end: {} agents × {} batches of {} readings over mosquitto, {} in flight each, {} samples",
        hubscale::AGENTS,
        p.scale_batches,
        hub::BATCH,
        hubscale::WINDOW,
        p.samples
    );
    let pg = hub::Pg::start();
    let (mut one, mut two) = (Samples::default(), Samples::default());
    let (mut cpu1, mut cpu2) = (Vec::new(), Vec::new());
    for i in 0..p.samples {
        for (hubs, s, cpu) in [(1, &mut one, &mut cpu1), (2, &mut two, &mut cpu2)] {
            let r = hubscale::run(exe, &pg, &format!("scale{hubs}_{i}"), hubs, p.scale_batches)?;
            let v = r.readings as f64 / r.secs;
            progress(&format!("{hubs} hub process(es)"), v);
            s.push(v);
            *cpu = r.cpu.iter().map(|(n, c)| format!("{n} {:.0} %", 100.0 * c / r.secs)).collect::<Vec<_>>();
        }
    }
    let note = |cpu: &[String]| {
        format!("CPU of each process over the run, in % of one core (last sample): {}.", cpu.join(", "))
    };
    Ok(vec![
        Row {
            id: "6a",
            name: format!(
                "end to end through 1 hub process: {} agents → mosquitto → hub → PostgreSQL → ack",
                hubscale::AGENTS
            ),
            result: one.fmt_rate(),
            limit: "–".into(),
            ratio: "–".into(),
            target: "–".into(),
            verdict: "–".into(),
            note: note(&cpu1),
        },
        Row {
            id: "6b",
            name: "same, 2 hub processes on one shared subscription and one database".into(),
            result: two.fmt_rate(),
            limit: format!("1 hub (6a): {}", one.fmt_rate()),
            ratio: pct(two.median(), one.median()),
            target: "report".into(),
            verdict: "–".into(),
            note: note(&cpu2),
        },
    ])
}

fn bench_rollout(p: &Params, root: &Path, exe: &Path, agent: &Path) -> Result<Vec<Row>> {
    let agents = if p.quick { 200 } else { 1000 };
    eprintln!("8. module rollout to {agents} simulated agents, {} samples", p.samples);
    let module = std::fs::read(root.join("target/modules/threshold.wasm")).context("the threshold example")?;
    let mut rows = Vec::new();
    for (id, waves, what) in [
        ("8a", vec!["100%"], "one wave"),
        ("8b", vec!["1", "10%", "50%", "100%"], "waves 1, 10 %, 50 %, 100 %, no probation"),
    ] {
        let (mut secs, mut last) = (Samples::default(), None);
        for _ in 0..p.samples {
            let r = rollout::run(exe, &module, agents, &waves)?;
            eprintln!("  {what:<44} {:>10.1} s", r.secs);
            secs.push(r.secs);
            last = Some(r);
        }
        let r = last.context("no sample")?;
        rows.push(Row {
            id,
            name: format!(
                "module rollout to {} agents, {what}: deployment created → every agent reports it running",
                group(agents as f64)
            ),
            result: format!("{:.1} s [{:.1}..{:.1}]", secs.median(), secs.min(), secs.max()),
            limit: "–".into(),
            ratio: "–".into(),
            target: "–".into(),
            verdict: "–".into(),
            note: format!(
                "Release hub on SQLite, default fleet.reconcile_interval (2 s); {} simulated agents in the benchmark process, each its own MQTT connection: presence, retained desired state, download of the {} threshold module over HTTP, sha256 and ed25519 check, report. Last sample: all downloaded after {:.1} s, done after {:.1} s; hub CPU {:.1} s, hub peak RSS {:.1} MB, mosquitto CPU {:.1} s; {} served by the hub ({} per agent, from its module cache); {} downloads retried.",
                group(agents as f64),
                fmt_bytes(r.module_bytes as f64),
                r.downloaded_secs,
                r.secs,
                r.hub_cpu,
                r.hub_hwm as f64 / 1e6,
                r.broker_cpu,
                fmt_bytes(r.bytes as f64),
                fmt_bytes(r.bytes as f64 / agents as f64),
                r.retries,
            ),
        });
    }
    rows.push(bench_swap(p, &module, exe, agent)?);
    Ok(rows)
}

/// 8c: how much a module swap delays the module's outputs on one real agent.
fn bench_swap(p: &Params, v1: &[u8], hub: &Path, agent: &Path) -> Result<Row> {
    let timing = swap::Timing::new(p.quick);
    eprintln!(
        "8c. module swap on one agent at {} readings/s: {} swaps, {:?} steady before, {:?} between, {:?} after, {} samples",
        swap::RATE,
        swap::SWAPS,
        timing.first,
        timing.between,
        timing.after,
        p.samples
    );
    let (mut during, mut steady) = (Samples::default(), Samples::default());
    let (mut during_p50, mut steady_p50) = (Samples::default(), Samples::default());
    let (mut during_max, mut steady_max) = (f64::NAN, f64::NAN);
    let mut swap_secs = Samples::default();
    let (mut n_during, mut n_steady, mut acked, mut sent, mut resent) = (0, 0, 0, 0, 0);
    let (mut missing, mut duplicated) = (0, 0);
    let mut last = None;
    for _ in 0..p.samples {
        let r = swap::run(agent, hub, v1, timing)?;
        let per_swap: Vec<String> =
            r.swaps.iter().map(|s| format!("{} {:.2} s / {:.0} ms", s.version, s.secs, s.max_ms)).collect();
        eprintln!(
            "  during swaps p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; steady p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
             swaps (done after / largest delay): {}",
            r.during.p50,
            r.during.p99,
            r.during.max,
            r.steady.p50,
            r.steady.p99,
            r.steady.max,
            per_swap.join(", ")
        );
        during.push(r.during.p99);
        steady.push(r.steady.p99);
        during_p50.push(r.during.p50);
        steady_p50.push(r.steady.p50);
        during_max = r.during.max.max(during_max);
        steady_max = r.steady.max.max(steady_max);
        for s in &r.swaps {
            swap_secs.push(s.secs);
        }
        n_during += r.during.count;
        n_steady += r.steady.count;
        acked += r.acked;
        sent += r.sent;
        resent += r.resent;
        missing += r.missing;
        duplicated += r.duplicated;
        last = Some(r);
    }
    let r = last.context("no sample")?;
    let ms = |s: &Samples| {
        if s.0.len() <= 1 {
            format!("{:.0} ms", s.median())
        } else {
            format!("{:.0} ms [{:.0}..{:.0}]", s.median(), s.min(), s.max())
        }
    };
    let per_swap: Vec<String> = r
        .swaps
        .iter()
        .map(|s| format!("{} done after {:.1} s, largest delay {:.0} ms", s.version, s.secs, s.max_ms))
        .collect();
    Ok(Row {
        id: "8c",
        name: format!(
            "module swap on one agent while {} readings/s flow: output delay (ingest → batch at the broker) during a swap vs steady",
            swap::RATE
        ),
        result: format!(
            "p99 {} during swaps vs {} steady; max {:.0} ms vs {:.0} ms",
            ms(&during),
            ms(&steady),
            during_max,
            steady_max
        ),
        limit: "–".into(),
        ratio: "–".into(),
        target: "–".into(),
        verdict: "–".into(),
        note: format!(
            "Release agent with its defaults (durability = full, commit_window = 50ms, module_runtime.threads = 1, \
             batch_max_readings = 1000, forward.batch_linger = 200ms) and [fleet] from a release hub (SQLite, \
             reconcile_interval = 200ms) over a private mosquitto; the threshold example (limit −1 on n: one output per \
             input) swapped v1 → v2 → v1 → v2 → v1, each a new deployment with probation 0s, {:?} of steady flow before, \
             {:?} between and {:?} after. Delay = arrival of the output's batch at a subscriber on the broker − the \
             input's ingest timestamp, so it includes the forwarder's batching (batch_linger) and the module runner, \
             not only the swap. \"During\" = ingested between a deploy request and the hub's done + {} s. p50 {} during \
             vs {} steady. Swap (deploy request → hub says done, polled every 50 ms) median {:.1} s, max {:.1} s over \
             {} swaps; each swap compiles the new build in a child process (the replaced build's compiled code is \
             dropped from the cache, so swapping back compiles again). Last sample: {}; agent CPU {:.1} s over {:.0} s, \
             compile children {:.1} s. {} outputs during swaps, {} steady, for {} acknowledged inputs ({} published); \
             {missing} missing, {duplicated} duplicated; builds by input order {} (checked in every sample); {} batch \
             re-sends seen and dropped.",
            timing.first,
            timing.between,
            timing.after,
            swap::AFTER_SWAP.as_secs(),
            ms(&during_p50),
            ms(&steady_p50),
            swap_secs.median(),
            swap_secs.max(),
            swap_secs.0.len(),
            per_swap.join("; "),
            r.agent_cpu,
            r.secs,
            r.children_cpu,
            group(n_during as f64),
            group(n_steady as f64),
            group(acked as f64),
            group(sent as f64),
            r.builds.join(", "),
            resent,
        ),
    })
}

fn bench_dashboard(exe: &Path) -> Result<Vec<Row>> {
    eprintln!(
        "10. the dashboard on a month of data: {} streams × 30 days, charts opened, ten live tails",
        dashboard::STREAMS
    );
    let r = dashboard::run(exe)?;
    let ms = |s: f64| format!("{:.0} ms", s * 1e3);
    let dataset = format!(
        "Release hub on its SQLite store holding {} streams × 30 days from {} agents: one reading per minute up to 3 h \
         ago (the one-minute rollups that answer ranges of 6 h and more have the same 43,200 rows per stream as at \
         1 Hz), one per second for the last 3 h (the raw readings ranges up to 1 h read); {} readings, stored in \
         {:.0} s.",
        dashboard::STREAMS,
        dashboard::AGENTS,
        group(r.readings as f64),
        r.load_secs
    );
    let worst = r.ranges.iter().flat_map(|x| x.secs.iter().copied()).fold(0.0, f64::max);
    let per_range: Vec<String> = r
        .ranges
        .iter()
        .map(|x| {
            format!(
                "{}{}: {} buckets ({}), p50 {}, max {}, {}",
                if x.fleet { "fleet " } else { "" },
                x.range,
                x.buckets,
                x.source,
                ms(Samples(x.secs.clone()).median()),
                ms(x.secs.iter().copied().fold(0.0, f64::max)),
                fmt_bytes(x.bytes as f64)
            )
        })
        .collect();
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    Ok(vec![
        Row {
            id: "10a",
            name: format!(
                "dashboard: open a chart of one of {} streams holding 30 days (each preset range, and fleet aggregation by label), slowest request",
                dashboard::STREAMS
            ),
            result: ms(worst),
            limit: "–".into(),
            ratio: "–".into(),
            target: "< 1 s".into(),
            verdict: if worst < 1.0 { "meets".into() } else { format!("**misses** ({})", ms(worst)) },
            note: format!(
                "{dataset} Each range opened for 20 streams, one after another, as the page asks (`niceStep`, 550 \
                 buckets at most), timed at the client with the body read: {}. Listing the streams took {}.",
                per_range.join("; "),
                ms(r.list_secs)
            ),
        },
        Row {
            id: "10b",
            name: "dashboard: hub memory and CPU while ten browsers watch live (ten SSE tails, 2 s steps, 10 readings/s each) for 60 s".into(),
            result: format!("RSS {} → {}; {:.1} % of a core", mb(r.rss_start), mb(r.rss_end), r.cpu_share * 100.0),
            limit: "–".into(),
            ratio: "–".into(),
            target: "bounded".into(),
            verdict: if r.rss_peak_last <= r.rss_peak_first + 5_000_000 { "meets".into() } else { "**misses** (grows)".into() },
            note: format!(
                "Same hub and data as 10a; the benchmark writes 10 readings/s to each tailed stream. Peak RSS in the first \
                 20 s {}, in the last 20 s {} (bounded: no growth beyond 5 MB between them); at least {} bucket events \
                 per tail. Each tail re-reads its last two buckets every second.",
                mb(r.rss_peak_first),
                mb(r.rss_peak_last),
                r.tail_events_min
            ),
        },
    ])
}

fn bench_hubquery(p: &Params, exe: &Path) -> Result<Row> {
    const CLIENTS: usize = 16;
    eprintln!(
        "6c. hub memory under queries: {CLIENTS} clients page through {} readings each, {} per page",
        group((p.query_batches * hub::BATCH as u64) as f64),
        group(cloud_hub::http::MAX_LIMIT as f64)
    );
    let (mut rss, mut rate) = (Samples::default(), Samples::default());
    let mut last = None;
    for _ in 0..p.samples {
        let r = hubquery::run(exe, p.query_batches, CLIENTS)?;
        progress("readings served", r.readings as f64 / r.secs);
        rss.push(r.hwm as f64);
        rate.push(r.readings as f64 / r.secs);
        last = Some(r);
    }
    let last = last.context("no sample")?;
    let mb = |b: f64| format!("{:.1} MB", b / 1e6);
    Ok(Row {
        id: "6c",
        name: format!(
            "hub memory while {CLIENTS} clients each page through {} readings of one stream (GET /api/v1/readings, {} per page)",
            group((p.query_batches * hub::BATCH as u64) as f64),
            group(cloud_hub::http::MAX_LIMIT as f64)
        ),
        result: format!("VmHWM {} [{}..{}]", mb(rss.median()), mb(rss.min()), mb(rss.max())),
        limit: "–".into(),
        ratio: "–".into(),
        target: "< 100 MB".into(),
        verdict: if rss.median() < 100e6 { "meets".into() } else { format!("**misses** ({})", mb(rss.median())) },
        note: format!(
            "Release hub on its SQLite store, preloaded; {CLIENTS} reqwest clients at once, each following `next` to the end \
             (http.max_concurrent_queries = {CLIENTS}, so none is refused). Served {} readings/s [{}..{}], {}/s of JSON \
             (last sample: {} in {:.1} s); RSS {} idle, {} at most (50 ms samples). Pages are streamed: read \
             {} readings at a time by keyset seek and sent in 64 KiB pieces. For comparison, not measured here: \
             issue 10 reports one request of 100,000 readings taking the hub from 12 to 349 MB; pages read whole \
             (10,000, encoded reading by reading) measured 144.8 MB in the previous full run.",
            group(rate.median()),
            group(rate.min()),
            group(rate.max()),
            fmt_bytes(last.bytes as f64 / last.secs),
            fmt_bytes(last.bytes as f64),
            last.secs,
            mb(last.idle_rss as f64),
            mb(last.peak_rss as f64),
            group(cloud_hub::http::SUB_PAGE as f64),
        ),
    })
}

fn bench_edgecost(p: &Params, agent: &Path, hub: &Path, rates: &[u32]) -> Result<Vec<Row>> {
    let wanted = |r: u32| rates.is_empty() || rates.contains(&r);
    use edgecost::Target;
    let (warmup, secs) = if p.quick { (Duration::from_secs(3), 10) } else { (Duration::from_secs(5), 30) };
    eprintln!(
        "7. edge cost at a steady rate: release agent (defaults) → mosquitto → release hub, and a mosquitto \
         store-and-forward bridge, {secs} s measured after {warmup:?}"
    );
    let per = |r: &edgecost::CostResult| {
        let n = r.readings.max(1) as f64;
        (1e6 * r.cpu_secs / n, r.write_bytes as f64 / n)
    };
    let fmt = |r: &edgecost::CostResult| {
        let (cpu, bytes) = per(r);
        format!(
            "{cpu:.1} µs CPU, {} B written per reading; PUBACK p50 {:.1} ms, p99 {:.1} ms",
            group(bytes),
            1e3 * r.p50,
            1e3 * r.p99
        )
    };
    let defaults = Target::Agent { agent, hub, store_extra: "" };
    let mut rows = Vec::new();
    // Targets of issue 16: CPU µs, bytes per reading, p99 ms.
    for (id, rate, t_cpu, t_bytes) in
        [("7a", 100u32, 60.0, 1000.0), ("7b", 1000, 20.0, 200.0), ("7c", 10_000, 10.0, 120.0)]
    {
        if !wanted(rate) {
            continue;
        }
        let a = edgecost::run(&defaults, rate, warmup, secs)?;
        eprintln!("  {rate}/s, agent: {}; {:.1} commits/s", fmt(&a), a.commits as f64 / a.secs);
        let b = edgecost::run(&Target::Bridge, rate, warmup, secs)?;
        eprintln!("  {rate}/s, mosquitto bridge: {}", fmt(&b));
        let ((cpu, bytes), (bcpu, bbytes)) = (per(&a), per(&b));
        let meets = cpu <= t_cpu && bytes <= t_bytes && a.p99 <= 0.1;
        rows.push(Row {
            id,
            name: format!("agent cost per reading at a steady {} readings/s (QoS 1, 10 topics, 1 connection, defaults)", group(f64::from(rate))),
            result: fmt(&a),
            limit: format!("mosquitto bridge: {}", fmt(&b)),
            // The bridge writes next to nothing (its queue is in memory): a ratio of bytes
            // would be a division by almost zero.
            ratio: format!("{:.1}x the CPU; {} B more written per reading", cpu / bcpu.max(1e-9), group(bytes - bbytes)),
            target: format!("≤ {t_cpu:.0} µs, ≤ {} B, p99 ≤ 100 ms", group(t_bytes)),
            verdict: if meets { "meets".into() } else { "**misses**".into() },
            note: format!(
                "{} readings acknowledged in {:.0} s; {:.1} commits/s; write_bytes and utime+stime of the process over that \
                 interval. Floor (the data written once to the WAL and once at checkpoint): {} B per reading, from {} B \
                 of agent.db per stored reading. The bridge keeps its queue in memory and saves it every second: a crash \
                 loses what it acknowledged since.",
                group(a.readings as f64),
                a.secs,
                a.commits as f64 / a.secs,
                group(2.0 * a.stored_bytes_per_reading),
                group(a.stored_bytes_per_reading),
            ),
        });
    }
    if !wanted(0) {
        return Ok(rows);
    }
    let idle = edgecost::run(&defaults, 0, warmup, secs)?;
    eprintln!(
        "  idle: {:.2} % CPU, {} B written per minute",
        100.0 * idle.cpu_secs / idle.secs,
        group(idle.write_bytes as f64 * 60.0 / idle.secs)
    );
    rows.push(Row {
        id: "7d",
        name: "idle agent (no input, hub connected)".into(),
        result: format!(
            "{:.2} % of a core, {} B written per minute",
            100.0 * idle.cpu_secs / idle.secs,
            group(idle.write_bytes as f64 * 60.0 / idle.secs)
        ),
        limit: "–".into(),
        ratio: "–".into(),
        target: "0 B/min, < 0.5 % CPU".into(),
        verdict: if idle.write_bytes == 0 && idle.cpu_secs / idle.secs < 0.005 {
            "meets".into()
        } else {
            "**misses**".into()
        },
        note: format!("Over {:.0} s after the warm-up; {} commits.", idle.secs, idle.commits),
    });
    Ok(rows)
}

fn hub_step_minutes(days: i64) -> i64 {
    let s = cloud_hub::aggregate::step_for(0, days * 86_400 * 1_000_000_000, 500);
    s / cloud_hub::aggregate::ROLLUP_NS
}

fn rel(p: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default();
    p.strip_prefix(&root).unwrap_or(p).display().to_string()
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn render_table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| # | Benchmark | Result: median [min..max] | Raw limit, same run | Ratio | Target | Verdict | Interpretation |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.id,
            cell(&r.name),
            cell(&r.result),
            cell(&r.limit),
            r.ratio,
            cell(&r.target),
            r.verdict,
            cell(&r.note)
        ));
    }
    t
}

fn render_doc(m: &Machine, command: &str, p: &Params, table: &str, rows: &[Row], total: f64, kept: &str) -> String {
    let _ = rows;
    let quick = if p.quick {
        "\n**This was a `--quick` smoke run (small N): the figures are not measurements.**\n"
    } else {
        ""
    };
    format!(
        "# Brume benchmarks\n\n\
         Generated by `{command}` (source: `xtask/src/`). Everything above the marker line is rewritten on every \
         `--write`. Benchmarks print figures; nothing asserts a timing.\n{quick}\n\
         ## Machine\n\n\
         - Date: {date}\n\
         - CPUs (nproc): {nproc}\n\
         - CPU: {cpu}\n\
         - Kernel: {kernel}\n\
         - Compiler: {rustc}\n\
         - Broker for comparisons: {mosq}\n\
         - Temporary directories (stores, raw SQLite files, agent data): `{tmp}` on {tmpfs}\n\
         - Whole run: {total:.0} s\n\n\
         ## Results\n\n\
         {table}\n\
         Rates are readings/s (raw SQLite: rows/s), median of {samples} samples with [min..max]; the RSS run is a \
         single {secs} s run. Every comparison figure comes from the same run, interleaved sample by sample with the \
         figure it is compared with. MB = 10^6 bytes, MiB = 2^20.\n\n\
         ## Method\n\n\
         1. **MQTT ingest.** `edge_agent::run` in-process on its own multi-threaded Tokio runtime (as the binary \
         does), with a fresh temporary `data_dir`, `forward.mode = off`, HTTP disabled, and the MQTT listener bound \
         to 127.0.0.1:0. One rumqttc 0.25 `AsyncClient` (MQTT 3.1.1, inflight 100, request channel 1,000) on a \
         current-thread runtime publishes N = {mqtt_n} PUBLISHes at QoS 1, each carrying one reading `{payload}`, \
         round-robin over {topics} topics; timed from the first publish to the N-th PUBACK (connecting is not timed). \
         After each agent sample the store is checked to hold exactly N readings. The comparison is a private \
         mosquitto on a free port (`listener PORT 127.0.0.1`, `allow_anonymous true`, `persistence false`), same client \
         and payloads. Client and server share the same cores.\n\
         2. **Batched ingest → store → outbox.** {store_n} readings from \
         `edge_agent::ingest::simulator::generate` over {streams} streams (3 fields: f64, i64, bool), generated before \
         the clock starts. `Store::apply` gets one 1,000-reading group per transaction; with the default \
         `forward.batch_max_readings = 1000` each commit also cuts one outbox batch (checked afterwards). \
         `StoreHandle::append`: 4 Tokio tasks, group i to task i mod 4, each awaiting its commit. Raw SQLite: rusqlite \
         (bundled SQLite), WAL, prepared `INSERT INTO t(stream, ts, fields)` into \
         `CREATE TABLE t(id INTEGER PRIMARY KEY, stream INTEGER, ts INTEGER, fields BLOB)` of the same blobs. Each \
         sample uses a fresh store or file in a fresh temporary directory under `{tmp}`; open and close are not timed.\n\
         3. **RSS.** `cargo build --release -p edge-agent`, then the binary runs as a process with `--simulate \
         {rate}` (100-reading appends every 100 ms), its MQTT listener and HTTP server on free ports, forwarding in \
         `hub` mode to a private mosquitto with no hub behind it: batches are published and never acknowledged, so \
         they accumulate in the outbox and are re-sent after `forward.ack_timeout` — the worst case for memory. \
         After {secs} s VmHWM and VmRSS are read from `/proc/<pid>/status`, then the agent gets SIGTERM. A \
         subscriber on `#` counts what reaches the broker. Row 3c is the same run with the five example modules \
         (`target/modules/*.wasm`, each with `inputs = [\"sim/#\"]`) in the config.\n\
         4. **WASM modules.** `cargo xtask build-modules` first. 4a: one batch of {wasm_batch} simulated readings \
         (`sensors/<n>` streams) processed {wasm_batches} times per sample by the threshold example through \
         `brume_wasm_host::ModuleInstance::process` (fuel and epoch interruption on, limits from the manifest), \
         interleaved with the same filter compiled natively and driven through the SDK's byte-level runtime \
         (`brume_module_sdk::rt::Runtime`: postcard decode of the input, filter, postcard encode of the output); both \
         must keep the same readings. 4b: 200 instantiations per sample; 4c: 20,000 calls with an empty batch; 4d: one \
         `WasmEngine::load`. 4e: a store pre-filled with {pipeline_n} simulated readings on 100 streams, then \
         `edge_agent::modules::ModuleRunners` with the threshold module from the first reading (`start_at = \
         \"earliest\"`, batches of 1,000, `durability = full`), timed from the module's load to its cursor passing \
         the last reading.\n\
         5. **Hub stores.** {hub_days} days of one reading per second on one stream (one `value` field), as batches of \
         1,000 readings from one agent, generated before the clock starts; `HubStore::ingest` with 10 batches per call \
         (one transaction), into a fresh SQLite store and a fresh database on a private PostgreSQL server (initdb in a \
         temporary directory, PostgreSQL's default settings: fsync, synchronous commit, full page writes; one hub \
         connection; a partition window reaching back to the data's 2024 days, so they land in daily partitions as live \
         data does). 5c streams the same rows with COPY BINARY into a table of the hub's shape (same columns, daily \
         partitions created beforehand, same index) in the same server, 10 batches per transaction. 5d re-ingests every batch into the PostgreSQL store afterwards. 5e/5f: \
         `cloud_hub::aggregate::aggregate` over the whole range with `step_for(from, to, 500)`, 20 runs each on the \
         last sample's stores; each run checks that the buckets count every reading.\n\
         6. **Hub processes end to end.** `cargo build --release -p cloud-hub`; a private mosquitto and a private durable \
         PostgreSQL (one fresh database per sample); 1 or 2 `cloud-hub` processes on the same shared subscription \
         and database; {scale_agents} simulated agents in the benchmark process (one rumqttc client each) publish \
         {scale_batches} pre-encoded 1,000-reading batches each, keeping {scale_window} in flight and advancing on the \
         hubs' acknowledgements; timed from the first publish to the last acknowledgement. CPU per process from \
         `/proc/<pid>/stat` (PostgreSQL: the postmaster and its backends) over the same interval. 6c: one release \
         `cloud-hub` on a SQLite store preloaded (before the process starts) with 1,000,000 readings of one stream; 16 \
         reqwest clients at once page through all of it with the largest page, following `next`; VmRSS sampled every \
         50 ms, VmHWM read at the end; each client checks it received every reading.\n\
         7. **Edge cost at a steady rate.** The release `edge-agent` as a process with its defaults \
         (`durability = \"full\"`, `commit_window = \"50ms\"`, `page_size = \"1 KiB\"`), forwarding in hub mode over a \
         private mosquitto to a release `cloud-hub` on SQLite (batches acknowledged, as in production); one rumqttc \
         publisher (10 topics, QoS 1, 100 in flight, JSON `{{\"value\":n}}`) at a fixed rate in 10 ms ticks; after a \
         warm-up (5 s), the process's utime+stime (`/proc/<pid>/stat`), `write_bytes` (`/proc/<pid>/io`) and \
         `brume_agent_commits_total` are read at the start and end of 30 s, and every PUBACK latency in between is \
         kept. The comparison, in the same run with the same publisher: a mosquitto configured for store-and-forward \
         (`persistence true`, `autosave_interval 1`, `max_queued_messages 0`, a bridge `topic # out 1`, \
         `cleansession false`, to a second mosquitto standing for the cloud, where a subscriber checks that ≥ 99 % of \
         what was published arrived); its figures are the first mosquitto's. The floor beside each row is twice the \
         bytes of `agent.db` in use per stored reading after the run (each reading written once to the WAL, once at \
         checkpoint). 7d: no publisher. `--rates 100,1000` runs a subset.\n\n\
         {KEEP_MARKER}\n\n{kept}",
        date = m.date,
        nproc = m.nproc,
        cpu = m.cpu,
        kernel = m.kernel,
        rustc = m.rustc,
        mosq = m.mosquitto,
        tmp = std::env::temp_dir().display(),
        tmpfs = m.tmp_fs,
        samples = p.samples,
        secs = p.rss_secs,
        mqtt_n = group(p.mqtt_n as f64),
        payload = String::from_utf8_lossy(mqtt::PAYLOAD),
        topics = mqtt::TOPICS,
        store_n = group(p.store_n as f64),
        streams = store::STREAMS,
        rate = p.rss_rate,
        wasm_batch = group(wasm::BATCH as f64),
        wasm_batches = group(p.wasm_batches as f64),
        pipeline_n = group(p.pipeline_n as f64),
        hub_days = p.hub_days,
        scale_agents = hubscale::AGENTS,
        scale_batches = p.scale_batches,
        scale_window = hubscale::WINDOW,
    )
}
