//! The web dashboard, served by the hub itself at `/ui/`: static files compiled into the
//! binary (`cloud-hub/dashboard/`), so deploying the hub deploys the dashboard and it
//! works without internet access. The pages are plain JavaScript over the JSON API
//! (`/api/v1/...`); the hub renders nothing per request and keeps no session state.
//!
//! The chart library is uPlot (MIT, its licence beside it in `dashboard/vendor/`), vendored
//! as its minified release build.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// A file of the dashboard: path under `/ui/`, content type, bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

/// Every file the dashboard is made of.
const ASSETS: &[Asset] = &[
    Asset { path: "", content_type: "text/html; charset=utf-8", bytes: include_bytes!("../dashboard/index.html") },
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../dashboard/app.js"),
    },
    Asset { path: "app.css", content_type: "text/css; charset=utf-8", bytes: include_bytes!("../dashboard/app.css") },
    Asset {
        path: "vendor/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../dashboard/vendor/uPlot.iife.min.js"),
    },
    Asset {
        path: "vendor/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../dashboard/vendor/uPlot.min.css"),
    },
    Asset {
        path: "vendor/LICENSE-uPlot",
        content_type: "text/plain; charset=utf-8",
        bytes: include_bytes!("../dashboard/vendor/LICENSE-uPlot"),
    },
];

/// Only the hub's own scripts and styles run, and the page talks only to the hub:
/// device-supplied text (agent ids, labels, stream names) is never HTML, and this makes
/// an injection that slipped past that inert. uPlot positions elements through inline
/// styles, hence `style-src 'unsafe-inline'`; scripts get no such exception.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
                   form-action 'none'";

/// The dashboard's routes: `/` redirects to `/ui/`, which serves the files.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|| async { asset("") }))
        .route("/ui/{*path}", get(|axum::extract::Path(p): axum::extract::Path<String>| async move { asset(&p) }))
}

fn asset(path: &str) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.path == path) else {
        return (StatusCode::NOT_FOUND, "no such dashboard file").into_response();
    };
    let mut resp = a.bytes.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.content_type));
    // Files change only with the hub binary; revalidating is cheap and means an upgraded
    // hub is never shown with a stale script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_loads_is_served() {
        let index = std::str::from_utf8(ASSETS[0].bytes).unwrap();
        for needed in ["vendor/uPlot.min.css", "app.css", "vendor/uPlot.iife.min.js", "app.js"] {
            assert!(index.contains(&format!("\"{needed}\"")), "index.html does not load {needed}");
            assert!(ASSETS.iter().any(|a| a.path == needed), "{needed} is not served");
        }
        assert!(!index.contains("http://") && !index.contains("https://"), "the page loads nothing from elsewhere");
    }
}
