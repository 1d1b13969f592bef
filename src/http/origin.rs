//! Which pages may open the browser and automerge-repo WebSockets. A browser sends the page's
//! `Origin` with every WebSocket upgrade and, unlike `fetch`, enforces no CORS on the answer:
//! without this check any site a user visits could open a session on their behalf.

use actix_web::http::header;
use actix_web::HttpRequest;

use super::error::ApiError;

/// The allowed origins: `*` for any, listed ones, or (empty) the node's own pages only.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(Vec<String>);

impl AllowedOrigins {
    pub fn new(origins: Vec<String>) -> Self {
        AllowedOrigins(
            origins
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
        )
    }

    /// Refuses an upgrade from a page of another origin. Requests without an `Origin` are not
    /// from a browser page (services, automerge-repo in Node.js) and pass.
    pub fn check(&self, req: &HttpRequest) -> Result<(), ApiError> {
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("").trim().to_ascii_lowercase();
        if self.0.iter().any(|o| o == "*" || *o == origin) {
            return Ok(());
        }
        if self.0.is_empty() && same_origin(&origin, req) {
            return Ok(());
        }
        Err(ApiError::Forbidden(format!(
            "pages from origin {origin:?} may not open this WebSocket \
             (crdt.admission.allowed-origins)"
        )))
    }
}

/// Whether `origin` (scheme://host[:port]) names the host the request was sent to.
fn same_origin(origin: &str, req: &HttpRequest) -> bool {
    let Ok(url) = url::Url::parse(origin) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    let origin_host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let request_host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    // Default ports are left out of either side: compare with and without them.
    let default_port = match url.scheme() {
        "https" => ":443",
        _ => ":80",
    };
    request_host == origin_host
        || request_host.strip_suffix(default_port) == Some(origin_host.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn req(origin: Option<&str>, host: &str) -> HttpRequest {
        let mut r = TestRequest::get().insert_header((header::HOST, host));
        if let Some(o) = origin {
            r = r.insert_header((header::ORIGIN, o));
        }
        r.to_http_request()
    }

    #[test]
    fn by_default_only_the_nodes_own_pages_get_in() {
        let allowed = AllowedOrigins::default();
        assert!(
            allowed.check(&req(None, "node:8080")).is_ok(),
            "no Origin: no browser"
        );
        assert!(allowed
            .check(&req(Some("http://node:8080"), "node:8080"))
            .is_ok());
        assert!(allowed
            .check(&req(Some("https://crdt.example"), "crdt.example:443"))
            .is_ok());
        assert!(allowed
            .check(&req(Some("http://evil.example"), "node:8080"))
            .is_err());
        assert!(allowed
            .check(&req(Some("http://node:9999"), "node:8080"))
            .is_err());
        assert!(allowed.check(&req(Some("null"), "node:8080")).is_err());
    }

    #[test]
    fn listed_origins_or_any() {
        let allowed = AllowedOrigins::new(vec!["https://app.example/".into()]);
        assert!(allowed
            .check(&req(Some("https://APP.example"), "node:8080"))
            .is_ok());
        assert!(allowed
            .check(&req(Some("http://node:8080"), "node:8080"))
            .is_err());
        let any = AllowedOrigins::new(vec!["*".into()]);
        assert!(any
            .check(&req(Some("http://evil.example"), "node:8080"))
            .is_ok());
    }
}
