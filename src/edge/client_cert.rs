//! Client certificates (mTLS): what the gateway takes from a verified certificate (subject, SANs, SHA-256
//! thumbprint), a route's rules on it, certificate-bound tokens (RFC 8705 §3: `cnf.x5t#S256`), and the fields the
//! upstream gets. The chain itself is verified during the handshake (`server/tls.rs`); this module only sees
//! certificates rustls accepted.

use base64::Engine;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The verified client certificate of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// RFC 4514 form (`CN=api,O=Example`).
    pub subject: String,
    /// Subject alternative names: URIs, DNS names, e-mail addresses and IP addresses, as text.
    pub sans: Vec<String>,
    /// base64url (no padding) SHA-256 of the DER certificate: `x5t#S256`.
    pub thumbprint: String,
}

impl ClientCert {
    /// Reads what the policy needs from a DER certificate rustls verified. None if it does not parse (rustls
    /// accepted it, so this does not happen with a sane chain; such a connection then has no certificate).
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject().to_string();
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                use x509_parser::extensions::GeneralName;
                match name {
                    GeneralName::URI(u) => sans.push((*u).to_string()),
                    GeneralName::DNSName(d) => sans.push((*d).to_string()),
                    GeneralName::RFC822Name(e) => sans.push((*e).to_string()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => sans.push(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()),
                        16 => {
                            let mut b = [0u8; 16];
                            b.copy_from_slice(ip);
                            sans.push(std::net::Ipv6Addr::from(b).to_string());
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let thumbprint = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
        Some(ClientCert { subject, sans, thumbprint })
    }
}

/// A route's rules on the client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertPolicy {
    /// The subject must be exactly this (RFC 4514 form).
    pub subject: Option<String>,
    /// One SAN must match one of these: exact, or a prefix when the pattern ends in `*`.
    pub san_any: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("the route needs a client certificate and the connection has none")]
    Missing,
    #[error("the client certificate's subject is not the one the route names")]
    Subject,
    #[error("no subject alternative name of the client certificate matches the route's cert_san_any")]
    San,
    #[error("the token is bound to another certificate (cnf.x5t#S256)")]
    Binding,
}

impl CertPolicy {
    /// Checks a connection's certificate against the route's rules.
    pub fn check(&self, cert: Option<&ClientCert>) -> Result<(), CertError> {
        let cert = cert.ok_or(CertError::Missing)?;
        if self.subject.as_ref().is_some_and(|s| *s != cert.subject) {
            return Err(CertError::Subject);
        }
        if !self.san_any.is_empty() && !cert.sans.iter().any(|san| self.san_any.iter().any(|p| san_matches(p, san))) {
            return Err(CertError::San);
        }
        Ok(())
    }
}

fn san_matches(pattern: &str, san: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => san.starts_with(prefix),
        None => pattern == san,
    }
}

/// RFC 8705 §3: a token whose claims carry `cnf.x5t#S256` is good only over a connection with that certificate.
pub fn check_binding(claims: &serde_json::Map<String, serde_json::Value>, cert: Option<&ClientCert>) -> Result<(), CertError> {
    let Some(cnf) = claims.get("cnf").and_then(|c| c.as_object()) else { return Ok(()) };
    let Some(want) = cnf.get("x5t#S256") else { return Ok(()) };
    match (want.as_str(), cert) {
        (Some(w), Some(c)) if aws_lc_rs::constant_time::verify_slices_are_equal(w.as_bytes(), c.thumbprint.as_bytes()).is_ok() => Ok(()),
        _ => Err(CertError::Binding),
    }
}

/// The names the upstream gets the certificate under (`[identity] cert_*_header`); removed from every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertHeaders {
    pub subject: HeaderName,
    pub sans: HeaderName,
    pub thumbprint: HeaderName,
}

impl Default for CertHeaders {
    fn default() -> CertHeaders {
        CertHeaders {
            subject: HeaderName::from_static("x-client-cert-subject"),
            sans: HeaderName::from_static("x-client-cert-sans"),
            thumbprint: HeaderName::from_static("x-client-cert-thumbprint"),
        }
    }
}

impl CertHeaders {
    /// Sets the verified certificate's fields. Bytes outside visible ASCII (and `%`, and `,` inside a SAN, which
    /// separates them) are percent-encoded, so the upstream can read back exactly what was verified.
    pub fn insert(&self, headers: &mut HeaderMap, cert: &ClientCert) {
        let sans: Vec<String> = cert.sans.iter().map(|s| encode(s, true)).collect();
        for (name, value) in
            [(&self.subject, encode(&cert.subject, false)), (&self.sans, sans.join(", ")), (&self.thumbprint, cert.thumbprint.clone())]
        {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name.clone(), v);
            }
        }
    }
}

fn encode(s: &str, comma: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' && !(comma && b == b',') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> ClientCert {
        ClientCert { subject: "CN=api".into(), sans: vec!["spiffe://prod/ns/payments/sa/api".into()], thumbprint: "abc".into() }
    }

    #[test]
    fn san_rules_match_exactly_or_by_prefix() {
        let p = CertPolicy { subject: None, san_any: vec!["spiffe://prod/ns/payments/*".into()] };
        assert!(p.check(Some(&cert())).is_ok());
        let p = CertPolicy { subject: None, san_any: vec!["spiffe://prod/ns/pay".into()] };
        assert!(matches!(p.check(Some(&cert())), Err(CertError::San)));
        let p = CertPolicy { subject: Some("CN=other".into()), san_any: vec![] };
        assert!(matches!(p.check(Some(&cert())), Err(CertError::Subject)));
        assert!(matches!(CertPolicy::default().check(None), Err(CertError::Missing)));
    }

    #[test]
    fn bound_tokens_need_their_certificate() {
        let claims = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert!(check_binding(&claims(serde_json::json!({"sub": "a"})), None).is_ok());
        let bound = claims(serde_json::json!({"cnf": {"x5t#S256": "abc"}}));
        assert!(check_binding(&bound, Some(&cert())).is_ok());
        assert!(check_binding(&bound, None).is_err());
        let other = ClientCert { thumbprint: "abd".into(), ..cert() };
        assert!(check_binding(&bound, Some(&other)).is_err());
        assert!(check_binding(&claims(serde_json::json!({"cnf": {"x5t#S256": 5}})), Some(&cert())).is_err());
    }

    #[test]
    fn forwarded_values_are_encoded_reversibly() {
        assert_eq!(encode("CN=a,O=b", false), "CN=a,O=b");
        assert_eq!(encode("uri://x,y%", true), "uri://x%2Cy%25");
        assert_eq!(encode("CN=é", false), "CN=%C3%A9");
    }
}
