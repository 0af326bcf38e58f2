//! API tokens and dashboard sessions against a running hub.

use cloud_hub::auth::{Scope, TokenConfig, new_token};
use reqwest::StatusCode;
use serde_json::json;

use crate::util::{Hub, Mosquitto};

/// Every API route needs a token with its scope once tokens are configured: 401 without
/// or with an unknown one, 403 with the wrong scope, the route's answer with the right
/// one; health, metrics, the dashboard's files and module downloads stay open. The
/// session cookie works like the header, and a change made with it needs the CSRF header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_scopes_guard_the_api() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let (reader, reader_sha) = new_token();
    let (deployer, deployer_sha) = new_token();
    let hub = Hub::start_with(broker.port, |cfg| {
        cfg.http.tokens = vec![
            TokenConfig { name: "dashboards".into(), sha256: reader_sha, scopes: vec![Scope::Read] },
            TokenConfig { name: "ci".into(), sha256: deployer_sha, scopes: vec![Scope::Read, Scope::Modules] },
        ];
    })
    .await;
    let c = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", hub.url);
    let get = |p: &str, token: Option<&str>| {
        let mut r = c.get(url(p));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    for open in ["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json", "/ui/", "/ui/app.js"] {
        let s = get(open, None).await.unwrap().status();
        // /readyz may say 503 until the hub has its broker connection: not a refusal.
        assert!(
            s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN && s != StatusCode::NOT_FOUND,
            "{open} is open: {s}"
        );
    }
    // Module downloads by sha256 (agents make them): 404 for an unknown module, not 401.
    assert_eq!(get(&format!("/api/v1/registry/modules/{}", "ab".repeat(32)), None).await.unwrap().status(), 404);

    let r = get("/api/v1/streams", None).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("www-authenticate"));
    assert!(r.text().await.unwrap().contains("token"), "the 401 says what is missing");
    assert_eq!(get("/api/v1/streams", Some("brume_nope")).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(get("/api/v1/streams", Some(&reader)).await.unwrap().status(), StatusCode::OK);
    assert_eq!(get("/api/v1/fleet/agents", Some(&reader)).await.unwrap().status(), StatusCode::OK);

    // A change: the reader may not deploy (403 naming the scope); the deployer reaches the
    // route (400: no such module), so the scope check is what refused the reader.
    let deploy = |token: &str| {
        c.post(url("/api/v1/deployments")).bearer_auth(token).json(&json!({"module": "nope", "version": "1"})).send()
    };
    let r = deploy(&reader).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("modules"), "the 403 names the scope");
    let s = deploy(&deployer).await.unwrap().status();
    assert!(s.is_client_error() && s != StatusCode::FORBIDDEN && s != StatusCode::UNAUTHORIZED, "{s}");
    // Quarantine actions need the fleet scope, which no token here has.
    assert_eq!(c.delete(url("/api/v1/quarantine/1")).bearer_auth(&deployer).send().await.unwrap().status(), 403);

    // The dashboard's session: log in (the CSRF header is required), then the cookie
    // authenticates; a change with the cookie but without the CSRF header is refused.
    let login = |token: &str, csrf: bool| {
        let mut r = c.post(url("/api/v1/session")).json(&json!({ "token": token }));
        if csrf {
            r = r.header("x-brume-csrf", "1");
        }
        r.send()
    };
    assert_eq!(login(&deployer, false).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(login("brume_nope", true).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let r = login(&deployer, true).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["name"], "ci");
    assert_eq!(body["scopes"], json!(["read", "modules"]));
    let cookie = set.split(';').next().unwrap().to_owned();
    let with_cookie = |r: reqwest::RequestBuilder| r.header("cookie", cookie.clone());
    assert_eq!(with_cookie(c.get(url("/api/v1/streams"))).send().await.unwrap().status(), 200);
    assert_eq!(with_cookie(c.get(url("/api/v1/session"))).send().await.unwrap().status(), 200);
    let change = || with_cookie(c.post(url("/api/v1/deployments"))).json(&json!({"module": "nope", "version": "1"}));
    let r = change().send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a cookie-authenticated change without the CSRF header");
    let s = change().header("x-brume-csrf", "1").send().await.unwrap().status();
    assert!(s.is_client_error() && s != StatusCode::FORBIDDEN && s != StatusCode::UNAUTHORIZED, "{s}");
    let r = c.delete(url("/api/v1/session")).header("x-brume-csrf", "1").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    hub.stop().await;
}

/// The operator's path: `cloud-hub token` prints the token and the config entry; the CLI
/// sends the token from `BRUME_TOKEN` and reports the hub's refusal without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_tokens_and_uses_them() {
    let exe = env!("CARGO_BIN_EXE_cloud-hub");
    let out = std::process::Command::new(exe).args(["token", "--name", "ops", "--scope", "read"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let entry = String::from_utf8(out.stderr).unwrap();
    let sha256 = entry.lines().find_map(|l| l.strip_prefix("sha256 = ")).unwrap().trim_matches('"').to_owned();
    assert!(entry.contains("[[http.tokens]]") && entry.contains("scopes = [\"read\"]"), "{entry}");
    let bad = std::process::Command::new(exe).args(["token", "--name", "x", "--scope", "root"]).output().unwrap();
    assert!(!bad.status.success());

    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start_with(broker.port, |cfg| {
        cfg.http.tokens = vec![TokenConfig { name: "ops".into(), sha256, scopes: vec![Scope::Read] }];
    })
    .await;
    let url = hub.url.clone();
    let cli = move |token: Option<String>| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut c = std::process::Command::new(exe);
                c.args(["agents", "ls", "--hub", &url]).env_remove("BRUME_TOKEN");
                if let Some(t) = token {
                    c.env("BRUME_TOKEN", t);
                }
                c.output().unwrap()
            })
            .await
            .unwrap()
        }
    };
    let refused = cli(None).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"), "{}", String::from_utf8_lossy(&refused.stderr));
    let ok = cli(Some(token)).await;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    hub.stop().await;
}

/// Without tokens the API is open (as before tokens existed) and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_api_is_open() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start(broker.port).await;
    assert_eq!(hub.get("/api/v1/streams").await.0, 200);
    let s = hub.get_json("/api/v1/session").await;
    assert_eq!(s["open"], true);
    hub.stop().await;
}
