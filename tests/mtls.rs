//! Client certificates (mTLS): certificates and CAs made here with real keys, a TLS client presenting them, route
//! rules on subject and SANs, certificate-bound tokens (RFC 8705), the fields the upstream gets, and handshakes
//! refused for a foreign CA or a missing certificate where one is required.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use serde_json::json;

/// A CA that signs client certificates.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages =
        vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign, rcgen::KeyUsagePurpose::DigitalSignature];
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) }
}

/// A client certificate: its chain and key for rustls, and its x5t#S256.
struct ClientId {
    der: rustls_pki_types::CertificateDer<'static>,
    key: Vec<u8>,
    thumbprint: String,
}

fn client_cert(ca: &Ca, cn: &str, san_uri: &str) -> ClientId {
    client_cert_numbered(ca, cn, san_uri, 7)
}

fn client_cert_numbered(ca: &Ca, cn: &str, san_uri: &str, serial: u64) -> ClientId {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(san_uri).unwrap())];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let der = cert.der().clone();
    let thumbprint = b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der).as_ref());
    ClientId { der, key: key.serialize_der(), thumbprint }
}

/// An HTTP/1.1 client over TLS to the gateway, presenting `id` when given.
fn mtls_client(gw: &TestGateway, id: Option<&ClientId>) -> TestClient {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pem_roots(&gw.cert_path()));
    let cfg = match id {
        Some(id) => b.with_client_auth_cert(vec![id.der.clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(id.key.clone().into())).unwrap(),
        None => b.with_no_client_auth(),
    };
    let conn = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(cfg).https_only().enable_http1().build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(conn)
}

/// Sends a GET; None when the connection failed (a handshake the gateway refused).
async fn try_get(c: &TestClient, url: &str, headers: &[(&str, &str)]) -> Option<Answer> {
    let mut b = http::Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let rsp = c.request(b.body(Full::new(Bytes::new())).unwrap()).await.ok()?;
    let (status, version) = (rsp.status(), rsp.version());
    let headers = rsp.headers().clone();
    let body = http_body_util::BodyExt::collect(rsp.into_body()).await.ok()?.to_bytes();
    Some(Answer { status, headers, body, version })
}

fn config(up: &Upstream, issuer: &TestIssuer, client_auth: &str) -> String {
    format!(
        r#"
[listen]
https = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tls]
cert = "gateway.crt"
key = "gateway.key"
self_signed = true
client_ca = "clients-ca.pem"
client_auth = "{client_auth}"

[upstreams.api]
url = "{up}"

{issuer}

[[routes]]
name = "payments"
path = "/payments/*"
upstream = "api"
auth = "public"
cert_san_any = ["spiffe://prod/ns/payments/*"]

[[routes]]
name = "ops"
path = "/ops/*"
upstream = "api"
auth = "public"
client_cert = "required"
cert_subject = "CN=ops"

[[routes]]
name = "bound"
path = "/bound/*"
upstream = "api"

[[routes]]
name = "open"
path = "/open/*"
upstream = "api"
auth = "public"
"#,
        up = up.url(),
        issuer = issuer.config()
    )
}

#[tokio::test]
async fn client_certificates_are_verified_checked_per_route_and_forwarded() {
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let (clients, other) = (ca("clients CA"), ca("another CA"));
        let api = client_cert(&clients, "api", "spiffe://prod/ns/payments/sa/api");
        let ops = client_cert(&clients, "ops", "spiffe://prod/ns/ops/sa/runner");
        let foreign = client_cert(&other, "api", "spiffe://prod/ns/payments/sa/api");
        let gw = issuer.gateway_with(&config(&up, &issuer, "optional"), &[("clients-ca.pem", clients.pem.as_bytes())]).await;
        let (none, with_api, with_ops, with_foreign) =
            (mtls_client(&gw, None), mtls_client(&gw, Some(&api)), mtls_client(&gw, Some(&ops)), mtls_client(&gw, Some(&foreign)));
        let url = |p: &str| gw.https_url(p);

        // A SAN rule: the right SAN passes, with the certificate forwarded; another SAN or none is refused.
        let a = try_get(&with_api, &url("/payments/x"), &[]).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        let seen = up.last().unwrap();
        let field = |n: &str| seen.headers.get(n).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(field("x-client-cert-subject").as_deref(), Some("CN=api"));
        assert_eq!(field("x-client-cert-sans").as_deref(), Some("spiffe://prod/ns/payments/sa/api"));
        assert_eq!(field("x-client-cert-thumbprint"), Some(api.thumbprint.clone()));
        let hits = up.hits();
        assert_eq!(try_get(&with_ops, &url("/payments/x"), &[]).await.unwrap().status, 403);
        assert_eq!(try_get(&none, &url("/payments/x"), &[]).await.unwrap().status, 403);

        // A subject rule.
        assert_eq!(try_get(&with_ops, &url("/ops/x"), &[]).await.unwrap().status, 200);
        assert_eq!(try_get(&with_api, &url("/ops/x"), &[]).await.unwrap().status, 403);
        assert_eq!(up.hits(), hits + 1, "refused requests reached nothing");

        // A certificate from another CA: the handshake fails.
        assert!(try_get(&with_foreign, &url("/open/x"), &[]).await.is_none(), "a foreign CA's certificate was accepted");

        // A client without a certificate cannot forge the fields.
        let a = try_get(&none, &url("/open/x"), &[("X-Client-Cert-Subject", "CN=ops"), ("X-Client-Cert-Thumbprint", &ops.thumbprint)])
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        let seen = up.last().unwrap();
        assert!(seen.headers.get("x-client-cert-subject").is_none() && seen.headers.get("x-client-cert-thumbprint").is_none());

        // Certificate-bound tokens (RFC 8705 §3): only over the connection with that certificate.
        let bound = mint_token(&issuer.key, None, &claims(TestIssuer::ISS, "svc", json!({"cnf": {"x5t#S256": api.thumbprint}})));
        let bearer = format!("Bearer {bound}");
        assert_eq!(try_get(&with_api, &url("/bound/x"), &[("authorization", &bearer)]).await.unwrap().status, 200);
        let a = try_get(&with_ops, &url("/bound/x"), &[("authorization", &bearer)]).await.unwrap();
        assert_eq!(a.status, 401);
        assert!(header(&a, "www-authenticate").unwrap().contains("invalid_token"));
        assert_eq!(try_get(&none, &url("/bound/x"), &[("authorization", &bearer)]).await.unwrap().status, 401);
        let unbound = format!("Bearer {}", issuer.token("alice", &[]));
        assert_eq!(try_get(&none, &url("/bound/x"), &[("authorization", &unbound)]).await.unwrap().status, 200);

        let m = metrics(&plain_client(), &gw).await;
        assert_eq!(metric(&m, "portcullis_authz_denied_total", &[("route", "payments"), ("rule", "client_cert")]), Some(2.0));
        assert_eq!(metric(&m, "portcullis_auth_failures_total", &[("route", "bound"), ("reason", "cert_binding")]), Some(2.0));
        drop((none, with_api, with_ops, with_foreign));
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn client_auth_required_refuses_a_handshake_without_a_certificate() {
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let clients = ca("clients CA");
        let api = client_cert(&clients, "api", "spiffe://prod/ns/payments/sa/api");
        let gw = issuer.gateway_with(&config(&up, &issuer, "required"), &[("clients-ca.pem", clients.pem.as_bytes())]).await;
        assert!(try_get(&mtls_client(&gw, None), &gw.https_url("/open/x"), &[]).await.is_none(), "no certificate, yet served");
        assert_eq!(try_get(&mtls_client(&gw, Some(&api)), &gw.https_url("/open/x"), &[]).await.unwrap().status, 200);
        assert_eq!(up.hits(), 1);
        gw.stop().await;
    })
    .await;
}

/// A CRL of `ca` revoking these serial numbers.
fn crl(ca: &Ca, revoked: &[u64]) -> String {
    let now = time::OffsetDateTime::now_utc();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(1),
        next_update: now + time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from(1u64 + revoked.len() as u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(*s),
                revocation_time: now - time::Duration::minutes(1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params.signed_by(&ca.issuer).unwrap().pem().unwrap()
}

#[tokio::test]
async fn a_certificate_revoked_in_the_crl_is_refused_after_a_reload() {
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let clients = ca("clients CA");
        let (kept, revoked) = (
            client_cert_numbered(&clients, "kept", "spiffe://prod/ns/payments/sa/kept", 100),
            client_cert_numbered(&clients, "gone", "spiffe://prod/ns/payments/sa/gone", 101),
        );
        let cfg = config(&up, &issuer, "optional")
            .replace("client_auth = \"optional\"", "client_auth = \"optional\"\nclient_crl = \"clients.crl\"");
        let empty = crl(&clients, &[]);
        let files: [(&str, &[u8]); 2] = [("clients-ca.pem", clients.pem.as_bytes()), ("clients.crl", empty.as_bytes())];
        let gw = issuer.gateway_with(&cfg, &files).await;
        let url = gw.https_url("/payments/x");
        assert_eq!(try_get(&mtls_client(&gw, Some(&revoked)), &url, &[]).await.unwrap().status, 200, "not revoked yet");
        write_atomic(&gw.dir.path().join("clients.crl"), crl(&clients, &[101]).as_bytes());
        gw.gw.as_ref().unwrap().reload().await.unwrap();
        assert!(try_get(&mtls_client(&gw, Some(&revoked)), &url, &[]).await.is_none(), "a revoked certificate was accepted");
        assert_eq!(try_get(&mtls_client(&gw, Some(&kept)), &url, &[]).await.unwrap().status, 200);
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn certificate_rules_without_client_ca_do_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nname = \"r\"\npath = \"/*\"\nupstream = \"api\"\nauth = \"public\"\nclient_cert = \"sometimes\"\ncert_san_any = [\"*\"]\n",
    )
    .unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    for want in ["client_cert must be \"required\"", "client certificate rules need [tls] client_ca", "cert_san_any must list"] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}
