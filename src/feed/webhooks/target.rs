//! Which URLs a webhook may be sent to: http(s) with a host, and, when the configuration
//! lists allowed hosts, one of those (`example.com`, or `*.example.com` for its subdomains).

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BadTarget {
    #[error("{0:?} is not a URL: {1}")]
    Unparsable(String, String),
    #[error("a webhook URL is http:// or https://, not {0}://")]
    Scheme(String),
    #[error("the webhook URL names no host")]
    NoHost,
    #[error("host {0:?} is not among the configuration's allowed webhook hosts")]
    NotAllowed(String),
    #[error("a webhook URL may not carry a user or password")]
    Credentials,
}

/// The hosts webhooks may be sent to; empty: any.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    pub fn new(hosts: Vec<String>) -> Self {
        AllowedHosts(hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect())
    }

    fn allows(&self, host: &str) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|allowed| match allowed.strip_prefix("*.") {
                    Some(domain) => host
                        .strip_suffix(domain)
                        .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
                    None => allowed == host,
                })
    }

    /// The URL, checked.
    pub fn check(&self, url: &str) -> Result<url::Url, BadTarget> {
        let parsed =
            url::Url::parse(url).map_err(|e| BadTarget::Unparsable(url.into(), e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(BadTarget::Scheme(parsed.scheme().into()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(BadTarget::Credentials);
        }
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or(BadTarget::NoHost)?
            .to_ascii_lowercase();
        if !self.allows(&host) {
            return Err(BadTarget::NotAllowed(host));
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_on_allowed_hosts() {
        let any = AllowedHosts::default();
        assert!(any.check("https://hooks.example.com/x").is_ok());
        assert_eq!(
            any.check("ftp://example.com/").unwrap_err(),
            BadTarget::Scheme("ftp".into())
        );
        assert!(matches!(
            any.check("file:///etc/passwd"),
            Err(BadTarget::Scheme(_))
        ));
        assert!(matches!(
            any.check("not a url"),
            Err(BadTarget::Unparsable(..))
        ));
        assert_eq!(
            any.check("https://u:p@example.com/").unwrap_err(),
            BadTarget::Credentials
        );
        let some = AllowedHosts::new(vec!["Receiver.internal".into(), "*.example.com".into()]);
        assert!(some.check("http://receiver.internal:8080/hook").is_ok());
        assert!(some.check("https://a.example.com/").is_ok());
        assert_eq!(
            some.check("https://example.com/").unwrap_err(),
            BadTarget::NotAllowed("example.com".into())
        );
        assert!(some.check("https://evilexample.com/").is_err());
        assert!(some.check("http://169.254.169.254/").is_err());
    }
}
