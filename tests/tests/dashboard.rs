//! The hub's web dashboard in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`, fantoccini), against a hub fed by a running
//! agent. Screenshots go to `target/test-artifacts/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use brume_e2e::{Agent, Hub, Mosquitto, Proc, Sensor, free_port, skip, wait_until};
use brume_signing::SecretKey;
use brume_test_support::built_module_bytes;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const AGENT: &str = env!("CARGO_BIN_EXE_e2e-edge-agent");
const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");

/// How long the page may take to show something the hub already has: the fleet page
/// refreshes every 5 s, a chart draws within a second.
const PAGE: Duration = Duration::from_secs(30);

/// A chromedriver on a free port and a headless Chromium session through it.
struct Browser {
    client: Client,
    _driver: Proc,
    downloads: tempfile::TempDir,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a browser session, or says why it cannot.
    async fn start() -> Result<Browser, String> {
        let which = |exe: &str| {
            std::env::var_os("PATH")
                .and_then(|p| std::env::split_paths(&p).map(|d| d.join(exe)).find(|f| f.is_file()))
                .ok_or_else(|| {
                    format!("{exe} is not installed (scripts/deps.sh installs chromium and chromium-driver)")
                })
        };
        let driver_exe = which("chromedriver")?;
        let chromium = which("chromium")?;
        let port = free_port();
        let logs = tempfile::tempdir().map_err(|e| e.to_string())?;
        let driver = Proc::spawn(
            "chromedriver",
            &driver_exe,
            &[format!("--port={port}")],
            &logs.path().join("chromedriver.log"),
        )
        .map_err(|e| format!("{e:#}"))?;
        wait_until("chromedriver", Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await
        .map_err(|e| e.to_string())?;
        let downloads = tempfile::tempdir().map_err(|e| e.to_string())?;
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1000", format!("--user-data-dir={}", profile.path().display())],
                "prefs": {
                    "download.default_directory": downloads.path(),
                    "download.prompt_for_download": false,
                },
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .map_err(|e| format!("starting a Chromium session: {e}"))?;
        Ok(Browser { client, _driver: driver, downloads, _profile: profile })
    }

    /// Waits for an element, failing with the page's text when it never comes.
    async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        match self.client.wait().at_most(PAGE).for_element(Locator::Css(css)).await {
            Ok(e) => e,
            Err(e) => {
                let text = match self.client.find(Locator::Css("body")).await {
                    Ok(b) => b.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                panic!("{css} never appeared: {e}\npage:\n{text}");
            }
        }
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.client.find(Locator::Css(css)).await.ok()?.attr(name).await.ok()?
    }

    /// Saves a screenshot as a test artifact.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = artifacts();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }
}

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts")
}

async fn get_json(hub: &Hub, path: &str) -> Value {
    let r = reqwest::Client::new().get(format!("{}{path}", hub.url)).bearer_auth(hub.token.as_ref().unwrap());
    r.send().await.unwrap().error_for_status().unwrap().json().await.unwrap()
}

/// CSV rows as strings (no quoting needed for these numbers and names).
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    text.lines().map(|l| l.split(',').map(str::to_owned).collect()).collect()
}

/// An operator opens the dashboard on a hub fed by a running agent: the stream list shows
/// the agent's streams; picking one draws a chart with one point per bucket the API
/// returns for the page's own request; the table view has those rows; the exported CSV
/// has exactly the API's buckets; combining the stream across the agents with a label
/// draws the fleet aggregation; the fleet page shows the agent online with its platform
/// and labels, then offline once it is stopped; a module uploaded to the registry is
/// deployed from the modules page and rolled back from the deployment page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_data_and_fleet_in_a_real_browser() {
    let browser = match Browser::start().await {
        Ok(b) => b,
        Err(why) => return skip("dashboard_shows_data_and_fleet_in_a_real_browser", &why),
    };
    let broker = Mosquitto::start().unwrap();
    let key = SecretKey::generate();
    let fleet = format!("[fleet]\ntrusted_keys = [{:?}]\nreconcile_interval = \"200ms\"\n", key.public().to_string());
    // The hub has API tokens: the browser logs in with one (scopes read and modules).
    let (token, sha256) = cloud_hub::auth::new_token();
    let tokens =
        format!("[[http.tokens]]\nname = \"operator\"\nsha256 = {sha256:?}\nscopes = [\"read\", \"modules\"]\n");
    let mut hub = Hub::start_with(Path::new(HUB), broker.port, &format!("{tokens}{fleet}")).await.unwrap();
    hub.token = Some(token.clone());
    let fleet = format!("hub_url = {:?}\ntrusted_keys = [{:?}]", hub.url, key.public().to_string());
    let mut agent = Agent::start(
        Path::new(AGENT),
        "dash-1",
        broker.port,
        &[("forward", "heartbeat = \"1s\""), ("labels", "site = \"plant-1\""), ("fleet", &fleet)],
    )
    .await
    .unwrap();
    let start_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let sensor = Sensor::start(agent.mqtt_port, 2, 50);
    wait_until("readings at the hub", PAGE, || async { hub.total().await >= 200 }).await.unwrap();
    let (acked, _) = sensor.stop().await;
    agent.wait_drained(PAGE).await;
    let end_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!(acked.len() >= 200);
    let c = &browser.client;

    // Data: pick the stream from the list, over a fixed range so the page's request and
    // ours ask the same question.
    let range = format!("field=n&range=custom&from={}&to={}&live=0", start_ms - 60_000, end_ms + 60_000);
    c.goto(&format!("{}/ui/#/data?{range}", hub.url)).await.unwrap();
    // Logged out, the page asks for a token; a wrong one is refused with the hub's reason.
    browser.wait_for("#login").await;
    c.find(Locator::Id("token")).await.unwrap().send_keys("brume_wrong").await.unwrap();
    c.find(Locator::Css("#login button")).await.unwrap().click().await.unwrap();
    wait_until("the login refusal", PAGE, || async {
        browser.attr("#login-error", "id").await.is_some()
            && c.find(Locator::Id("login-error")).await.unwrap().text().await.unwrap().contains("unknown")
    })
    .await
    .unwrap();
    let field = c.find(Locator::Id("token")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(&token).await.unwrap();
    c.find(Locator::Css("#login button")).await.unwrap().click().await.unwrap();
    assert!(browser.wait_for("#session-name").await.text().await.unwrap().contains("operator"));
    browser.wait_for("#stream-list li[data-stream=\"s/0\"]").await.click().await.unwrap();
    browser.wait_for("#chart[data-points]").await;
    let points: usize = browser.attr("#chart", "data-points").await.unwrap().parse().unwrap();
    let query = browser.attr("#data-body", "data-query").await.expect("the page says what it asked");
    assert!(query.starts_with("/api/v1/aggregate?") && query.contains("stream=s%2F0"), "{query}");
    let api = get_json(&hub, &query).await;
    let buckets = api["buckets"].as_array().unwrap();
    assert!(!buckets.is_empty(), "{api}");
    assert_eq!(points, buckets.len(), "one point per bucket of {query}");
    let total: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    let stored = hub.counts().await.unwrap().into_iter().find(|(s, _)| s == "s/0").unwrap().1;
    assert_eq!(total, stored, "the chart covers every stored reading of s/0");
    // uPlot drew into a canvas of the page's width.
    let canvas = c.find(Locator::Css("#chart canvas")).await.expect("a canvas");
    assert!(canvas.attr("width").await.unwrap().unwrap().parse::<u32>().unwrap() >= 300);
    browser.screenshot("dashboard-data.png").await;

    // Table view: one row per bucket.
    c.find(Locator::Id("view-toggle")).await.unwrap().click().await.unwrap();
    browser.wait_for("#data-table").await;
    let rows = c.find_all(Locator::Css("#data-table tbody tr")).await.unwrap();
    assert_eq!(rows.len(), buckets.len());

    // Export CSV: the file has exactly the API's buckets.
    c.find(Locator::Id("export-csv")).await.unwrap().click().await.unwrap();
    let csv_path = browser.downloads.path().join("s_0-n.csv");
    wait_until("the CSV download", PAGE, || {
        let p = csv_path.clone();
        async move { std::fs::read_to_string(&p).is_ok_and(|t| t.ends_with('\n')) }
    })
    .await
    .unwrap();
    let rows = csv_rows(&std::fs::read_to_string(&csv_path).unwrap());
    assert_eq!(rows[0], ["start", "start_ns", "count", "min", "max", "mean", "last"]);
    assert_eq!(rows.len() - 1, buckets.len());
    for (row, b) in rows[1..].iter().zip(buckets) {
        assert_eq!(row[1], b["start_ns"].to_string());
        assert_eq!(row[2], b["count"].to_string());
        for (i, k) in [(3, "min"), (4, "max"), (5, "mean"), (6, "last")] {
            assert_eq!(row[i].parse::<f64>().unwrap(), b[k].as_f64().unwrap(), "{k} of {row:?}");
        }
    }

    // The same stream combined across the agents labelled site=plant-1.
    c.goto(&format!("{}/ui/#/data?stream=s%2F0&label=site%3Aplant-1&{range}", hub.url)).await.unwrap();
    c.refresh().await.unwrap();
    browser.wait_for("#chart[data-points]").await;
    let query = browser.attr("#data-body", "data-query").await.unwrap();
    assert!(query.starts_with("/api/v1/fleet/aggregate?") && query.contains("label=site%3Aplant-1"), "{query}");
    let fleet = get_json(&hub, &query).await;
    assert_eq!(fleet["agents"], json!(["dash-1"]));
    let points: usize = browser.attr("#chart", "data-points").await.unwrap().parse().unwrap();
    assert_eq!(points, fleet["buckets"].as_array().unwrap().len());
    assert!(points > 0);
    browser.screenshot("dashboard-fleet-aggregate.png").await;

    // Live: the last 15 minutes, updated from /api/v1/tail as new readings arrive.
    c.goto(&format!("{}/ui/#/data?stream=s%2F0&field=n&range=15m", hub.url)).await.unwrap();
    c.refresh().await.unwrap();
    browser.wait_for("#chart[data-points]").await;
    let before: usize = browser.attr("#chart", "data-points").await.unwrap().parse().unwrap();
    let first_query = browser.attr("#data-body", "data-query").await.unwrap();
    let sensor = Sensor::start_named(agent.mqtt_port, "s", 2, 50);
    wait_until("the live chart to draw new buckets", PAGE, || async {
        browser.attr("#chart", "data-points").await.and_then(|p| p.parse::<usize>().ok()).is_some_and(|p| p > before)
    })
    .await
    .unwrap();
    sensor.stop().await;
    agent.wait_drained(PAGE).await;
    // The new points came from the tail: the page did not ask the aggregate API again.
    assert_eq!(browser.attr("#data-body", "data-query").await.unwrap(), first_query);
    browser.screenshot("dashboard-live.png").await;

    // Modules: a signed upload shows in the registry; the deploy form rolls it out to the
    // agent; the deployment page follows it to done, and its rollback action works.
    let wasm = built_module_bytes("downsample");
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/registry/modules", hub.url))
        .bearer_auth(&token)
        .header("Brume-Signature", key.sign(&wasm).to_string())
        .body(wasm)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    c.goto(&format!("{}/ui/#/modules", hub.url)).await.unwrap();
    c.refresh().await.unwrap();
    let registry = browser.wait_for("#registry-table tbody tr").await.text().await.unwrap();
    assert!(registry.starts_with("downsample 0.1.0"), "{registry}");
    c.find(Locator::Id("deploy-selector")).await.unwrap().send_keys("site=plant-1").await.unwrap();
    c.find(Locator::Id("deploy-config")).await.unwrap().send_keys(r#"{"window_s": 5, "field": "n"}"#).await.unwrap();
    c.find(Locator::Id("deploy-probation")).await.unwrap().send_keys("1s").await.unwrap();
    c.find(Locator::Css(".controls button")).await.unwrap().click().await.unwrap();
    browser.wait_for("#progress-table tr td.online").await;
    let url = c.current_url().await.unwrap();
    let id = url.fragment().and_then(|f| f.strip_prefix("/deployment/")).expect("on the deployment page").to_owned();
    let d = get_json(&hub, &format!("/api/v1/deployments/{id}")).await;
    assert_eq!((d["module"].clone(), d["selector"].clone()), (json!("downsample"), json!({"site": "plant-1"})), "{d}");
    assert_eq!(d["config"], json!({"window_s": 5, "field": "n"}));
    wait_until("the deployment to be done", PAGE, || async {
        get_json(&hub, &format!("/api/v1/deployments/{id}")).await["state"] == "done"
    })
    .await
    .unwrap();
    browser.wait_for("#deployment-state[data-state=\"done\"]").await;
    browser.screenshot("dashboard-deployment.png").await;
    c.find(Locator::Css("button[data-action=\"rollback\"]")).await.unwrap().click().await.unwrap();
    c.send_alert_text("checked from the dashboard").await.unwrap();
    c.accept_alert().await.unwrap();
    browser.wait_for("#deployment-state[data-state=\"rolled_back\"]").await;
    let d = get_json(&hub, &format!("/api/v1/deployments/{id}")).await;
    assert_eq!(d["reason"], "checked from the dashboard", "{d}");

    // Fleet: online with platform and labels, then offline once stopped.
    c.goto(&format!("{}/ui/#/fleet", hub.url)).await.unwrap();
    browser.wait_for("#fleet-table tr[data-agent=\"dash-1\"] td[data-status=\"online\"]").await;
    let row = c.find(Locator::Css("#fleet-table tr[data-agent=\"dash-1\"]")).await.unwrap().text().await.unwrap();
    assert!(row.contains("site=plant-1"), "{row}");
    assert!(row.contains(std::env::consts::ARCH), "platform column: {row}");
    browser.screenshot("dashboard-fleet.png").await;
    agent.proc.terminate();
    browser.wait_for("#fleet-table tr[data-agent=\"dash-1\"] td[data-status=\"offline\"]").await;
    browser.screenshot("dashboard-fleet-offline.png").await;

    // The agent page renders.
    c.find(Locator::Css("#fleet-table tr[data-agent=\"dash-1\"] a")).await.unwrap().click().await.unwrap();
    let title = browser.wait_for("#agent-title").await.text().await.unwrap();
    assert!(title.starts_with("dash-1"), "{title}");
    // Its streams, each linking to its chart.
    let streams = browser.wait_for("#agent-streams tbody").await.text().await.unwrap();
    assert!(streams.contains("s/0") && streams.contains("s/1"), "{streams}");

    browser.client.close().await.unwrap();
}
