//! Which URLs a webhook may be sent to: http(s) with a host, and, when the configuration
//! lists allowed hosts, one of those (`example.com`, or `*.example.com` for its subdomains).
//! With no list, any host but the node's own neighbourhood: loopback, private, link-local and
//! unspecified addresses (and `localhost`) must be listed to be reached, so a subscription
//! cannot make the node probe the services beside it or a cloud's metadata address.

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
    #[error("host {0:?} is a local or private address: list it in the allowed webhook hosts to reach it")]
    Local(String),
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
        if self.0.is_empty() && local(&parsed) {
            return Err(BadTarget::Local(host));
        }
        Ok(parsed)
    }
}

/// Whether the URL names this node's neighbourhood rather than the internet.
fn local(url: &url::Url) -> bool {
    use std::net::IpAddr;
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            return d == "localhost" || d.ends_with(".localhost");
        }
        None => return false,
    };
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                // 100.64/10, shared address space (carrier-grade NAT, some clusters).
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
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

    #[test]
    fn the_node_s_neighbourhood_must_be_listed() {
        let any = AllowedHosts::default();
        for url in [
            "http://127.0.0.1:8080/",
            "http://10.0.0.5/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[fd00::1]/",
            "http://localhost:9000/",
            "http://0.0.0.0/",
        ] {
            assert!(matches!(any.check(url), Err(BadTarget::Local(_))), "{url}");
        }
        assert!(any.check("http://93.184.216.34/").is_ok());
        let listed = AllowedHosts::new(vec!["127.0.0.1".into()]);
        assert!(listed.check("http://127.0.0.1:8080/hook").is_ok());
    }
}
