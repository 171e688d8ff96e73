//! oslo.messaging's `transport_url`, read the way oslo reads it
//! (`oslo_messaging.TransportURL.parse`, then the rabbit driver):
//!
//! - `rabbit://user:pass@host:port,user2:pass2@host2:port2/vhost?option=value`;
//!   the URL is split as Python's `urllib.parse.urlparse` splits it;
//! - hosts are separated by commas; empty ones are skipped; user and
//!   password are percent-decoded; an IPv6 address with a port is written
//!   in brackets; a missing port is 5672; a host without credentials uses
//!   `guest:guest` (the AMQP client's default, as with oslo's kombu); no
//!   host at all means `localhost`;
//! - the virtual host is the percent-decoded path after the first `/`; an
//!   empty one is RabbitMQ's default `/` (`%2F` in the URL is the vhost `/`,
//!   `/nova` is `nova`);
//! - the query's options (parsed as `urllib.parse.parse_qs`: repeated keys
//!   joined with `,`, blank values dropped) override the driver's options of
//!   the same name — see [`super::config::BrokerConfig::with_url_options`]
//!   for those tether honours; any other is refused, never ignored.

use std::collections::BTreeMap;

use serde::Serialize;

/// One broker host of a transport URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransportHost {
    /// The host name or address (an IPv6 address without its brackets);
    /// `None` when the URL gave credentials but no host.
    pub hostname: Option<String>,
    /// The port, if given.
    pub port: Option<u16>,
    /// The user name, decoded.
    pub username: Option<String>,
    /// The password, decoded.
    pub password: Option<String>,
}

/// A transport URL, as oslo.messaging parses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransportUrl {
    /// The scheme (`rabbit`).
    pub transport: String,
    /// The virtual host, decoded; `None` without a path.
    pub virtual_host: Option<String>,
    /// The hosts, in order.
    pub hosts: Vec<TransportHost>,
    /// The query's options.
    pub query: BTreeMap<String, String>,
}

/// The port AMQP listens on unless told otherwise.
const AMQP_PORT: u16 = 5672;

impl TransportUrl {
    /// Parse `url`; `Err` says what is wrong with it.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = split_scheme(url).ok_or("no scheme (it starts rabbit://)")?;
        // urlparse: the fragment, then the query, then the netloc.
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (netloc, path) = match rest.strip_prefix("//") {
            Some(r) => match r.find('/') {
                Some(i) => r.split_at(i),
                None => (r, ""),
            },
            None => ("", rest),
        };
        if netloc.contains('[') != netloc.contains(']') {
            return Err("an unbalanced [ or ] (an IPv6 address is written [::1]:5672)".into());
        }
        // (urlparse takes `;params` off the path only for the schemes it
        // knows: not rabbit.)
        let virtual_host = path.strip_prefix('/').map(percent_decode);
        let mut hosts = vec![];
        for h in netloc.split(',').filter(|h| !h.is_empty()) {
            hosts.push(parse_host(h)?);
        }
        Ok(TransportUrl {
            transport: scheme,
            virtual_host,
            hosts,
            query: parse_qs(query),
        })
    }

    /// One AMQP URI per host, in order, for the AMQP client (`amqps://`
    /// with `tls`).
    pub fn amqp_uris(&self, tls: bool) -> Vec<String> {
        let scheme = if tls { "amqps" } else { "amqp" };
        let vhost = match self.virtual_host.as_deref() {
            None | Some("") => "/",
            Some(v) => v,
        };
        let vhost = percent_encode(vhost);
        let default = [TransportHost {
            hostname: None,
            port: None,
            username: None,
            password: None,
        }];
        let hosts = if self.hosts.is_empty() {
            &default[..]
        } else {
            &self.hosts[..]
        };
        hosts
            .iter()
            .map(|h| {
                let user = percent_encode(h.username.as_deref().unwrap_or("guest"));
                let pass = percent_encode(h.password.as_deref().unwrap_or("guest"));
                let name = match h.hostname.as_deref() {
                    None | Some("") => "localhost".to_string(),
                    Some(n) if n.contains(':') => format!("[{n}]"),
                    Some(n) => n.to_string(),
                };
                let port = h.port.unwrap_or(AMQP_PORT);
                format!("{scheme}://{user}:{pass}@{name}:{port}/{vhost}")
            })
            .collect()
    }
}

/// `scheme:rest`, the scheme lower-cased, as urlparse takes it.
fn split_scheme(url: &str) -> Option<(String, &str)> {
    let (scheme, rest) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (first_ok && rest_ok).then(|| (scheme.to_ascii_lowercase(), rest))
}

/// `user:pass@host:port` as oslo reads one host.
fn parse_host(h: &str) -> Result<TransportHost, String> {
    let (username, password, address) = match h.rsplit_once('@') {
        Some((cred, address)) => {
            let (u, p) = match cred.split_once(':') {
                Some((u, p)) => (u, Some(percent_decode(p))),
                None => (cred, None),
            };
            (Some(percent_decode(u)), p, address)
        }
        None => (None, None, h),
    };
    let (hostname, port) = parse_host_port(address)?;
    Ok(TransportHost {
        hostname,
        port,
        username,
        password,
    })
}

/// oslo.utils' `netutils.parse_host_port`: `host`, `host:port`,
/// `[v6]`, `[v6]:port`; an unbracketed address with several colons is an
/// IPv6 address without a port.
fn parse_host_port(address: &str) -> Result<(Option<String>, Option<u16>), String> {
    if address.is_empty() {
        return Ok((None, None));
    }
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{address:?}: the port must be a number from 0 to 65535"))
    };
    if let Some(v6) = address.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{address:?}: no closing ]"))?;
        if after.contains(']') || after.contains('[') {
            return Err(format!("{address:?}: more than one [...]"));
        }
        let p = match after.split_once(':') {
            Some((_, p)) => Some(port(p.split(':').next().unwrap_or(p))?),
            None => None,
        };
        return Ok((Some(host.to_string()), p));
    }
    if address.matches(':').count() == 1 {
        let (host, p) = address.split_once(':').unwrap_or((address, ""));
        return Ok((Some(host.to_string()), Some(port(p)?)));
    }
    Ok((Some(address.to_string()), None))
}

/// `urllib.parse.parse_qs` (blank values dropped), repeated keys joined
/// with `,` as oslo joins them.
fn parse_qs(query: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for pair in query.split('&') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        if v.is_empty() {
            continue;
        }
        let k = percent_decode(&k.replace('+', " "));
        let v = percent_decode(&v.replace('+', " "));
        out.entry(k)
            .and_modify(|old| {
                old.push(',');
                old.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

/// `%XX` → the byte; invalid escapes stay as they are; bytes that do not
/// form UTF-8 become U+FFFD (Python's `unquote` does the same).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|x| (*x as char).to_digit(16)),
                b.get(i + 2).and_then(|x| (*x as char).to_digit(16)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every byte but RFC 3986's unreserved ones as `%XX` (user, password and
/// vhost of an AMQP URI).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, port: Option<u16>, cred: Option<(&str, &str)>) -> TransportHost {
        TransportHost {
            hostname: Some(name.into()),
            port,
            username: cred.map(|c| c.0.into()),
            password: cred.map(|c| c.1.into()),
        }
    }

    #[test]
    fn hosts_vhosts_and_quoting_as_oslo() {
        let u = TransportUrl::parse("rabbit://u%24:p%26@host:1234/%24").unwrap();
        assert_eq!(u.hosts, vec![host("host", Some(1234), Some(("u$", "p&")))]);
        assert_eq!(u.virtual_host.as_deref(), Some("$"));
        assert_eq!(u.amqp_uris(false), vec!["amqp://u%24:p%26@host:1234/%24"]);
        // The vhost "/" written %2F, and "/nova" written %2Fnova.
        let u = TransportUrl::parse("rabbit://h/%2Fnova").unwrap();
        assert_eq!(u.virtual_host.as_deref(), Some("/nova"));
        assert_eq!(
            u.amqp_uris(false),
            vec!["amqp://guest:guest@h:5672/%2Fnova"]
        );
        // Empty hosts are skipped; IPv6 in brackets.
        let u = TransportUrl::parse("rabbit://a,,[::1]:5673,/").unwrap();
        assert_eq!(
            u.amqp_uris(false),
            vec![
                "amqp://guest:guest@a:5672/%2F",
                "amqp://guest:guest@[::1]:5673/%2F"
            ]
        );
        assert_eq!(
            TransportUrl::parse("rabbit://h:5671/")
                .unwrap()
                .amqp_uris(true),
            vec!["amqps://guest:guest@h:5671/%2F"]
        );
        // No host: localhost.
        assert_eq!(
            TransportUrl::parse("rabbit:///").unwrap().amqp_uris(false),
            vec!["amqp://guest:guest@localhost:5672/%2F"]
        );
        for bad in [
            "no-scheme",
            "rabbit://h:x/",
            "rabbit://h:70000/",
            "rabbit://[::1/",
        ] {
            assert!(TransportUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queries_as_parse_qs() {
        let u = TransportUrl::parse("rabbit://h/?a=1&a=2&b=&c&d=x+y%21").unwrap();
        let q: Vec<(&str, &str)> = u
            .query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(q, [("a", "1,2"), ("d", "x y!")]);
    }

    #[test]
    fn percent_coding_is_total() {
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
    }
}
