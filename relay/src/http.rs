//! Serves published transcripts over HTTP, read-only: `/t/{id}` (the HTML page) and
//! `/t/{id}.json`. Every response forbids scripts, framing, sniffing, referrers and caching (a
//! withdrawn transcript should not linger in caches).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use caisey_doc::transcript::group::Published;
use caisey_doc::transcript::html;
use caisey_peer::node::Node;
use tokio::net::TcpListener;
use tracing::warn;

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, node: Node) {
    let app = Router::new().route("/", get(index)).route("/t/{file}", get(transcript)).with_state(node);
    if let Err(e) = axum::serve(listener, app).await {
        warn!("HTTP server stopped: {e}");
    }
}

fn secured(mut response: Response, content_type: &'static str) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(csp) = HeaderValue::from_str(&html::content_security_policy()) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    response
}

async fn index() -> Response {
    secured(
        "caisey relay: transcripts are served at the links their publishers share\n".into_response(),
        "text/plain; charset=utf-8",
    )
}

async fn transcript(State(node): State<Node>, Path(file): Path<String>) -> Response {
    let (id, json) = match file.strip_suffix(".json") {
        Some(id) => (id.to_string(), true),
        None => (file, false),
    };
    let not_found = || {
        secured(
            (StatusCode::NOT_FOUND, "no such transcript (it may have been withdrawn)\n").into_response(),
            "text/plain; charset=utf-8",
        )
    };
    // Link ids are 26 base32 characters; anything else is not worth a lookup.
    if id.len() != 26 || !id.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)) {
        return not_found();
    }
    let Ok(Some(bytes)) = caisey_peer::publish::published(&node, &id).await else { return not_found() };
    if json {
        return secured(bytes.into_response(), "application/json");
    }
    match Published::verify(&bytes) {
        Ok(published) => secured(published.html().into_response(), "text/html; charset=utf-8"),
        Err(e) => {
            warn!("a stored transcript no longer verifies: {e}");
            secured(
                (StatusCode::INTERNAL_SERVER_ERROR, "this transcript is damaged\n").into_response(),
                "text/plain; charset=utf-8",
            )
        }
    }
}
