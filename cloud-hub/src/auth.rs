//! API tokens with scopes, and dashboard sessions.
//!
//! Tokens are random (`brume_` and 64 hex digits, from `cloud-hub token`); the config
//! holds only their sha256 (`[[http.tokens]]`), so a leaked config file or config map
//! grants nothing, and every hub of a fleet accepts the same tokens without shared state.
//! A request carries its token as `Authorization: Bearer <token>` (scripts, the CLI) or
//! in the `brume_token` cookie that `POST /api/v1/session` sets for the dashboard
//! (`HttpOnly`, `SameSite=Strict`).
//!
//! Each route needs one scope ([`required`]): `read` for every read, `modules` to upload
//! modules, deploy, act on rollouts and re-process, `fleet` to discard or re-ingest
//! quarantined batches. Health, readiness, metrics, the dashboard's static files and the
//! OpenAPI document are open, and so are module downloads by sha256, which agents make
//! (content-addressed, and agents verify the publisher's signature).
//!
//! Without tokens configured the API is open, as before, with a warning at start.
//!
//! Cross-site requests: a request authenticated by the cookie that changes something
//! must carry the header `x-brume-csrf: 1`, which a page on another site cannot send
//! without the hub's CORS consent (never given: the hub sends no CORS headers), on top of
//! `SameSite=Strict`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The cookie holding a dashboard session's token.
pub const COOKIE: &str = "brume_token";
/// The header a cookie-authenticated request that changes something must carry.
pub const CSRF_HEADER: &str = "x-brume-csrf";
/// How long a dashboard session lasts, seconds.
const SESSION_SECS: u64 = 12 * 3600;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read data, the fleet, modules, deployments, quarantine.
    Read,
    /// Upload modules, deploy, pause/resume/abort/roll back rollouts, re-process.
    Modules,
    /// Discard or re-ingest quarantined batches.
    Fleet,
}

impl Scope {
    /// Its name in config and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Modules => "modules",
            Scope::Fleet => "fleet",
        }
    }
}

/// One `[[http.tokens]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who or what holds it (logs, `GET /api/v1/session`).
    pub name: String,
    /// Hex sha256 of the token (printed by `cloud-hub token`).
    pub sha256: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

/// A known token.
#[derive(Debug, Clone)]
struct Token {
    name: String,
    scopes: Vec<Scope>,
}

/// The hub's tokens, by digest.
#[derive(Debug, Default)]
pub struct Auth {
    tokens: HashMap<[u8; 32], Token>,
}

/// A new random token and the config entry's digest.
pub fn new_token() -> (String, String) {
    let token = format!("brume_{}", brume_signing::to_hex(&rand::random::<[u8; 32]>()));
    let digest = brume_signing::to_hex(&Sha256::digest(token.as_bytes()));
    (token, digest)
}

impl Auth {
    /// From `[[http.tokens]]`; errors name the entry.
    pub fn new(tokens: &[TokenConfig]) -> Result<Auth, String> {
        let mut map = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            let digest = brume_signing::from_hex::<32>(&t.sha256)
                .map_err(|e| format!("entry {} ({:?}): sha256: {e}", i + 1, t.name))?;
            if t.scopes.is_empty() {
                return Err(format!("entry {} ({:?}): give at least one scope (read, modules, fleet)", i + 1, t.name));
            }
            if map.insert(digest, Token { name: t.name.clone(), scopes: t.scopes.clone() }).is_some() {
                return Err(format!("entry {} ({:?}): the same token twice", i + 1, t.name));
            }
        }
        Ok(Auth { tokens: map })
    }

    /// Whether the API is open (no token configured).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    fn lookup(&self, token: &str) -> Option<&Token> {
        self.tokens.get(&<[u8; 32]>::from(Sha256::digest(token.as_bytes())))
    }
}

/// The scope a request needs, or `None` for open routes.
pub fn required(method: &Method, path: &str) -> Option<Scope> {
    let open = matches!(path, "/" | "/ui" | "/healthz" | "/readyz" | "/metrics" | "/api/v1/openapi.json")
        || path.starts_with("/ui/")
        || path == "/api/v1/session";
    if open {
        return None;
    }
    let read = *method == Method::GET || *method == Method::HEAD;
    // Module downloads, which agents make: /api/v1/registry/modules/<sha256>[/precompiled/<target>].
    if read && let Some(rest) = path.strip_prefix("/api/v1/registry/modules/") {
        return if rest.is_empty() { Some(Scope::Read) } else { None };
    }
    if read {
        Some(Scope::Read)
    } else if path.starts_with("/api/v1/quarantine") {
        Some(Scope::Fleet)
    } else {
        Some(Scope::Modules)
    }
}

/// The token a request presents, and whether it came in the cookie.
fn presented(headers: &HeaderMap) -> Option<(&str, bool)> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(|t| (t.trim(), false));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')))
        .map(|t| (t, true))
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let mut r = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"brume\""));
    }
    r
}

/// The middleware: lets a request through if its route is open or its token has the
/// scope; otherwise 401 (no or unknown token) or 403 (wrong scope, or a cookie-authenticated
/// change without the CSRF header).
pub async fn check(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    if auth.is_open() {
        return next.run(req).await;
    }
    let Some(scope) = required(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let Some((token, cookie)) = presented(req.headers()) else {
        return refuse(StatusCode::UNAUTHORIZED, "this API needs a token: Authorization: Bearer <token>");
    };
    let Some(t) = auth.lookup(token) else {
        return refuse(StatusCode::UNAUTHORIZED, "unknown or revoked token");
    };
    if !t.scopes.contains(&scope) {
        tracing::info!(token = %t.name, scope = scope.as_str(), path = %req.uri().path(), "request refused: scope missing");
        return refuse(
            StatusCode::FORBIDDEN,
            &format!("token {:?} lacks the {:?} scope this needs", t.name, scope.as_str()),
        );
    }
    if cookie && scope != Scope::Read && req.headers().get(CSRF_HEADER).is_none_or(|v| v != "1") {
        return refuse(StatusCode::FORBIDDEN, "a change made with the session cookie needs the x-brume-csrf: 1 header");
    }
    next.run(req).await
}

/// `POST /api/v1/session` with `{"token": "..."}`: checks the token and sets the
/// session cookie. `GET`: who the request's token is. `DELETE`: clears the cookie.
pub async fn session(
    State(state): State<crate::http::AppState>,
    method: Method,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let auth = &state.auth;
    if method != Method::GET && headers.get(CSRF_HEADER).is_none_or(|v| v != "1") {
        return refuse(StatusCode::FORBIDDEN, "starting or ending a session needs the x-brume-csrf: 1 header");
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Login {
        token: String,
    }
    let describe = |t: Option<&Token>| {
        axum::Json(serde_json::json!({
            "open": auth.is_open(),
            "name": t.map(|t| t.name.clone()),
            "scopes": match t {
                Some(t) => t.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                None if auth.is_open() => vec!["read", "modules", "fleet"],
                None => vec![],
            },
        }))
    };
    match method {
        Method::GET => {
            if auth.is_open() {
                return describe(None).into_response();
            }
            match presented(&headers).and_then(|(t, _)| auth.lookup(t)) {
                Some(t) => describe(Some(t)).into_response(),
                None => refuse(StatusCode::UNAUTHORIZED, "no session: log in with a token"),
            }
        }
        Method::POST => {
            let Ok(login) = serde_json::from_slice::<Login>(&body) else {
                return refuse(StatusCode::BAD_REQUEST, "expected {\"token\": \"brume_...\"}");
            };
            if login.token.is_empty() || !login.token.bytes().all(|b| b.is_ascii_graphic()) {
                return refuse(StatusCode::BAD_REQUEST, "a token is printable ASCII without spaces");
            }
            let Some(t) = auth.lookup(&login.token) else {
                return refuse(StatusCode::UNAUTHORIZED, "unknown or revoked token");
            };
            tracing::info!(token = %t.name, "dashboard session started");
            let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_SECS}", login.token);
            let mut r = describe(Some(t)).into_response();
            r.headers_mut().insert(header::SET_COOKIE, header::HeaderValue::try_from(cookie).expect("ASCII checked"));
            r
        }
        Method::DELETE => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            r.headers_mut().insert(
                header::SET_COOKIE,
                header::HeaderValue::from_static("brume_token=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
            );
            r
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_scope_of_what_they_do() {
        let get = Method::GET;
        let post = Method::POST;
        for open in ["/", "/ui/", "/ui/app.js", "/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"] {
            assert_eq!(required(&get, open), None, "{open}");
        }
        assert_eq!(required(&get, "/api/v1/registry/modules/ab12"), None, "agents download modules");
        assert_eq!(required(&get, "/api/v1/registry/modules/ab12/precompiled/aarch64"), None);
        assert_eq!(required(&get, "/api/v1/registry/modules"), Some(Scope::Read));
        assert_eq!(required(&get, "/api/v1/readings"), Some(Scope::Read));
        assert_eq!(required(&get, "/api/v1/quarantine/3/payload"), Some(Scope::Read));
        assert_eq!(required(&post, "/api/v1/registry/modules"), Some(Scope::Modules));
        assert_eq!(required(&post, "/api/v1/registry/modules/ab12"), Some(Scope::Modules));
        assert_eq!(required(&post, "/api/v1/deployments/1/abort"), Some(Scope::Modules));
        assert_eq!(required(&post, "/api/v1/reprocess"), Some(Scope::Modules));
        assert_eq!(required(&Method::DELETE, "/api/v1/quarantine/3"), Some(Scope::Fleet));
        assert_eq!(required(&post, "/api/v1/quarantine/3/reingest"), Some(Scope::Fleet));
    }

    #[test]
    fn tokens_are_found_by_digest_and_the_config_is_checked() {
        let (token, digest) = new_token();
        assert!(token.starts_with("brume_") && token.len() == 70);
        let auth = Auth::new(&[TokenConfig { name: "ops".into(), sha256: digest.clone(), scopes: vec![Scope::Read] }])
            .unwrap();
        assert_eq!(auth.lookup(&token).unwrap().name, "ops");
        assert!(auth.lookup("brume_00").is_none());
        let bad = |sha256: &str, scopes: Vec<Scope>| {
            Auth::new(&[TokenConfig { name: "x".into(), sha256: sha256.into(), scopes }]).unwrap_err()
        };
        assert!(bad("zz", vec![Scope::Read]).contains("sha256"));
        assert!(bad(&digest, vec![]).contains("scope"));
        let twice = TokenConfig { name: "a".into(), sha256: digest, scopes: vec![Scope::Read] };
        assert!(Auth::new(&[twice.clone(), twice]).unwrap_err().contains("twice"));
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), None);
        h.insert(header::COOKIE, "a=b; brume_token=brume_1; c=d".parse().unwrap());
        assert_eq!(presented(&h), Some(("brume_1", true)));
        h.insert(header::AUTHORIZATION, "Bearer brume_2".parse().unwrap());
        assert_eq!(presented(&h), Some(("brume_2", false)));
    }
}
