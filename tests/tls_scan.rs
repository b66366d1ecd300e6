//! TLS as clients and scanners see it: the server's cipher order wins over the client's, and `testssl.sh` finds
//! nothing of severity MEDIUM or above beyond what a self-signed localhost test certificate must show.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use rustls::crypto::aws_lc_rs::cipher_suite as suite;
use rustls::{CipherSuite, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;

/// A self-signed certificate for localhost and 127.0.0.1, valid from yesterday for 90 days (as a real one from a
/// public CA would be), written as `gateway.crt` and `gateway.key`: the gateway serves it instead of generating
/// its development pair.
fn test_certificate() -> [(&'static str, Vec<u8>); 2] {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let now = rcgen::date_time_ymd(1970, 1, 1) + SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    params.not_before = now - Duration::from_secs(86_400);
    params.not_after = now + Duration::from_secs(90 * 86_400);
    let cert = params.self_signed(&key).unwrap();
    [("gateway.crt", cert.pem().into_bytes()), ("gateway.key", key.serialize_pem().into_bytes())]
}

async fn gateway_with_test_certificate(up: &Upstream) -> TestGateway {
    let files = test_certificate();
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    spawn_gateway_with_files(&public_config(up, ""), &files).await
}

// ------------------------------------------------------------------------------------------------------------
// The server's cipher order.

/// Handshakes with `suites` offered in that order, TLS `version` only; returns the suite the server chose.
async fn negotiated(gw: &TestGateway, version: &'static rustls::SupportedProtocolVersion, suites: &[SupportedCipherSuite]) -> CipherSuite {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = suites.to_vec();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_pki_types::CertificateDer::pem_file_iter(gw.cert_path()).unwrap().map(Result::unwrap));
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(gw.https.unwrap()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(BOUND, tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    tls.get_ref().1.negotiated_cipher_suite().expect("a suite").suite()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_chooses_its_own_preferred_suite_whatever_the_client_order() {
    bounded(async {
        let up = spawn_upstream().await;
        let gw = gateway_with_test_certificate(&up).await;
        // Each client offers CHACHA20 first and the server's favourite last.
        let tls13 = [suite::TLS13_CHACHA20_POLY1305_SHA256, suite::TLS13_AES_128_GCM_SHA256, suite::TLS13_AES_256_GCM_SHA384];
        let tls12 = [
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ];
        assert_eq!(negotiated(&gw, &rustls::version::TLS13, &tls13).await, CipherSuite::TLS13_AES_256_GCM_SHA384);
        assert_eq!(negotiated(&gw, &rustls::version::TLS12, &tls12).await, CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384);
        // The order is a preference, not a restriction: a client that offers only CHACHA20 gets it.
        assert_eq!(negotiated(&gw, &rustls::version::TLS13, &tls13[..1]).await, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
        assert_eq!(negotiated(&gw, &rustls::version::TLS12, &tls12[..1]).await, CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// testssl.sh

/// Findings a self-signed localhost test certificate must show, and only those: testssl ids, each with why.
const INHERENT_TO_A_TEST_CERTIFICATE: &[(&str, &str)] = &[
    ("cert_chain_of_trust", "a self-signed certificate chains to no trusted root"),
    ("cert_revocation", "a self-signed test certificate names no CRL or OCSP responder"),
];

/// The longest the scan may take (it takes about 45 s on two cores).
const SCAN_BOUND: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_nothing_of_medium_severity_or_above() {
    // Debian installs testssl.sh as `testssl`.
    let Some(testssl) = require_tool(&["testssl", "testssl.sh"], "testssl.sh") else { return };
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let gw = gateway_with_test_certificate(&up).await;
        let out = tempfile::tempdir().unwrap();
        let json = out.path().join("testssl.json");
        let target = format!("https://127.0.0.1:{}", gw.https.unwrap().port());
        let started = Instant::now();
        let run = {
            let (testssl, json) = (testssl.clone(), json.clone());
            tokio::task::spawn_blocking(move || scan(&testssl, &json, &target))
        };
        let (status, text) = run.await.unwrap();
        eprintln!("testssl took {:?}", started.elapsed());
        // testssl exits non-zero when one of its probes timed out (a busy machine); what it found is in its JSON,
        // and the checks below make sure the scan ran the checks that matter.
        assert!(status.success() || json.exists(), "testssl failed ({status}) and wrote nothing:\n{text}");
        if !status.success() {
            eprintln!("testssl exited {status}; judging its JSON");
        }
        let findings: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&json).expect("testssl wrote its JSON")).unwrap();
        let field = |f: &serde_json::Value, k: &str| f[k].as_str().unwrap_or_default().to_string();
        let ids: Vec<String> = findings.iter().map(|f| field(f, "id")).collect();
        // The scan reached the gateway and ran the checks that matter (a scan that ran nothing finds nothing).
        for must in ["TLS1_2", "TLS1_3", "cipher_order", "cert_chain_of_trust", "BREACH", "LUCKY13"] {
            assert!(ids.iter().any(|i| i == must), "testssl reported no {must}: the scan did not run as meant\n{text}");
        }
        let bad: Vec<String> = findings
            .iter()
            .filter(|f| matches!(field(f, "severity").as_str(), "MEDIUM" | "HIGH" | "CRITICAL" | "FATAL"))
            .filter(|f| !INHERENT_TO_A_TEST_CERTIFICATE.iter().any(|(id, _)| field(f, "id") == *id))
            .map(|f| format!("{} {}: {}", field(f, "severity"), field(f, "id"), field(f, "finding")))
            .collect();
        assert!(bad.is_empty(), "testssl findings of severity MEDIUM or above:\n{}\n\n{text}", bad.join("\n"));
        gw.stop().await;
    })
    .await;
}

/// Runs testssl against `target` (loopback only: no DNS, no calls out), bounded by [`SCAN_BOUND`] through
/// coreutils' `timeout`; returns its exit status and its screen output.
fn scan(testssl: &Path, json: &Path, target: &str) -> (std::process::ExitStatus, String) {
    let bound = SCAN_BOUND.as_secs().to_string();
    let out = std::process::Command::new("timeout")
        .args(["--kill-after=10", &bound])
        .arg(testssl)
        .args(["--quiet", "--color", "0", "--warnings", "off", "--nodns", "none"])
        .args(["--connect-timeout", "10", "--openssl-timeout", "10"])
        // Protocols, cipher categories, forward secrecy, server preference, certificate and defaults, HTTP
        // headers, vulnerabilities. Left out: client simulations and the one-by-one test of 370 ciphers, which
        // grade nothing the cipher categories and forward secrecy checks do not.
        .args(["-p", "-s", "-f", "-P", "-S", "-h", "-U"])
        .arg("--jsonfile")
        .arg(json)
        .arg(target)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("timeout (coreutils) runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status, text)
}
