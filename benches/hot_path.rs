//! Micro-benchmarks of the hot path: JWT verification (cache miss per algorithm, cache hit), route matching on a
//! 200-route table, header work, and the rate limiter. Run: `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis::auth::authz::AuthMode;
use portcullis::auth::Authenticator;
use portcullis::config::Config;
use portcullis::edge::headers_request::{self, Forwarding, IdentitySettings};
use portcullis::edge::headers_response::{self, SecureHeaders};
use portcullis::edge::ratelimit::{LimitKey, LimitSettings, LimitStore, Limiter};

struct Keys {
    dir: tempfile::TempDir,
    rsa: EncodingKey,
    ec: EncodingKey,
    ed: EncodingKey,
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or("")).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", body.join("\n"))
}

fn keys() -> Keys {
    use aws_lc_rs::encoding::AsDer;
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
    let pkcs8: aws_lc_rs::encoding::Pkcs8V1Der = rsa.as_der().expect("der");
    let spki: aws_lc_rs::encoding::PublicKeyX509Der = aws_lc_rs::signature::KeyPair::public_key(&rsa).as_der().expect("der");
    std::fs::write(dir.path().join("rs.pem"), pem("PUBLIC KEY", spki.as_ref())).expect("write");
    let rsa = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).expect("rsa pem");
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec");
    std::fs::write(dir.path().join("es.pem"), ec.public_key_pem()).expect("write");
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed");
    std::fs::write(dir.path().join("ed.pem"), ed.public_key_pem()).expect("write");
    std::fs::write(dir.path().join("hs.secret"), "0123456789abcdef0123456789abcdef").expect("write");
    Keys {
        rsa,
        ec: EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("ec pem"),
        ed: EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).expect("ed pem"),
        dir,
    }
}

fn config(dir: &Path, routes: usize) -> Config {
    let mut toml = String::from(
        r#"
[listen]
http = "127.0.0.1:0"
[upstreams.api]
url = "http://127.0.0.1:9"
[[issuers]]
id = "hs"
issuer = "hs"
algorithms = ["HS256"]
secret_file = "hs.secret"
[[issuers]]
id = "rs"
issuer = "rs"
algorithms = ["RS256"]
public_keys = ["rs.pem"]
[[issuers]]
id = "es"
issuer = "es"
algorithms = ["ES256"]
public_keys = ["es.pem"]
[[issuers]]
id = "ed"
issuer = "ed"
algorithms = ["EdDSA"]
public_keys = ["ed.pem"]
"#,
    );
    for i in 0..routes {
        toml.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\npath = \"/svc{i}/items/{{id}}\"\nupstream = \"api\"\nroles_any = [\"admin\"]\n"
        ));
    }
    toml.push_str("[[routes]]\nname = \"all\"\npath = \"/*\"\nupstream = \"api\"\nauth = \"public\"\n");
    Config::from_toml(&dir.join("gateway.toml"), &toml).expect("config")
}

fn token(iss: &str, alg: Algorithm, key: &EncodingKey, n: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let claims = serde_json::json!({"iss": iss, "sub": format!("user{n}"), "exp": now + 3600, "iat": now, "roles": ["admin"]});
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
}

fn bench_jwt(c: &mut Criterion) {
    let k = keys();
    let cfg = config(k.dir.path(), 1);
    let client = portcullis::auth::jwks::fetch_client(None).expect("client");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let authn = rt.block_on(async { Authenticator::new(&cfg.issuers, &client, None) });
    let hs = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
    let cases = [
        ("HS256", "hs", Algorithm::HS256, &hs),
        ("RS256", "rs", Algorithm::RS256, &k.rsa),
        ("ES256", "es", Algorithm::ES256, &k.ec),
        ("EdDSA", "ed", Algorithm::EdDSA, &k.ed),
    ];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut g = c.benchmark_group("jwt_verify_miss");
    for (name, iss, alg, key) in cases {
        let t = token(iss, alg, key, 1);
        g.bench_function(name, |b| b.iter(|| rt.block_on(authn.verify(black_box(&t), now)).expect("valid")));
    }
    g.finish();
    let t = token("rs", Algorithm::RS256, &k.rsa, 2);
    let mut h = HeaderMap::new();
    h.insert("authorization", HeaderValue::from_str(&format!("Bearer {t}")).expect("header"));
    rt.block_on(authn.authenticate(&h, AuthMode::Required)).expect("valid");
    c.bench_function("jwt_cache_hit_rs256", |b| {
        b.iter(|| rt.block_on(authn.authenticate(black_box(&h), AuthMode::Required)).expect("valid"))
    });
    // The same with revocations held (none of them this token's): the check a cached token pays then.
    use portcullis::store::{Revocation, Revoked};
    for i in 0..10_000 {
        authn.revocations().add_local(Revoked { what: Revocation::Jti { jti: format!("other-{i}") }, until: now + 3600 });
    }
    for i in 0..1_000 {
        let what = Revocation::Subject { issuer: None, sub: format!("someone-{i}"), before: now };
        authn.revocations().add_local(Revoked { what, until: now + 3600 });
    }
    c.bench_function("jwt_cache_hit_rs256_11k_revocations", |b| {
        b.iter(|| rt.block_on(authn.authenticate(black_box(&h), AuthMode::Required)).expect("valid"))
    });
}

fn bench_routes(c: &mut Criterion) {
    let k = keys();
    let cfg = config(k.dir.path(), 200);
    let table = &cfg.routes;
    c.bench_function("route_match_200_last", |b| {
        b.iter(|| {
            let p = portcullis::router::normalize_path(black_box("/svc199/items/42")).expect("path");
            table.match_route(&Method::GET, &p).map(|m| m.route.index).ok()
        })
    });
    c.bench_function("route_match_200_fallthrough", |b| {
        b.iter(|| {
            let p = portcullis::router::normalize_path(black_box("/static/app.js")).expect("path");
            table.match_route(&Method::GET, &p).map(|m| m.route.index).ok()
        })
    });
    c.bench_function("normalize_hostile_path", |b| {
        b.iter(|| portcullis::router::normalize_path(black_box("//a/./b/../%61dmin//x")).map(|p| p.len()))
    });
}

fn bench_headers(c: &mut Criterion) {
    let identity = IdentitySettings::default();
    let secure = SecureHeaders::defaults();
    let peer_ip = HeaderValue::from_static("127.0.0.1");
    let fwd = Forwarding { peer: "127.0.0.1:5000".parse().expect("addr"), peer_ip: &peer_ip, tls: true, from_trusted_proxy: false };
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        ("user-agent", "bench/1"),
        ("accept", "*/*"),
        ("connection", "keep-alive"),
        ("x-auth-subject", "forged"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    let host = HeaderValue::from_static("api.example.com");
    c.bench_function("headers_request_prepare", |b| {
        b.iter(|| {
            let mut h = base.clone();
            headers_request::strip_forged(&mut h, &identity);
            let rid = headers_request::new_request_id();
            headers_request::prepare_upstream(&mut h, &fwd, Some(&host), &rid, None, &identity, false).insert_into(&mut h);
            h
        })
    });
    let mut rsp = HeaderMap::new();
    rsp.insert("content-type", HeaderValue::from_static("application/json"));
    rsp.insert("server", HeaderValue::from_static("uvicorn"));
    c.bench_function("headers_response_finish", |b| {
        b.iter(|| {
            let mut h = rsp.clone();
            let rid = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
            headers_response::finish_response(&mut h, false);
            h.insert(headers_request::request_id_header().clone(), rid);
            headers_response::apply_secure_headers(&mut h, &secure, true, false);
            h
        })
    });
}

fn bench_limiter(c: &mut Criterion) {
    let l = Limiter::new(
        LimitSettings {
            key: LimitKey::Subject,
            per: Duration::from_nanos(1),
            burst: NonZeroU32::new(1_000_000).expect("nz"),
            store: LimitStore::Local,
        },
        64,
        None,
    );
    let ip = "192.0.2.7".parse().expect("ip");
    c.bench_function("limiter_check_allowed", |b| b.iter(|| l.check(&l.key(ip, Some(black_box(("local", "alice"))), |_| None)).is_ok()));
    let tight = Limiter::new(
        LimitSettings { key: LimitKey::Ip, per: Duration::from_secs(3600), burst: NonZeroU32::MIN, store: LimitStore::Local },
        64,
        None,
    );
    let k = tight.key(ip, None, |_| None);
    let _ = tight.check(&k);
    c.bench_function("limiter_check_limited", |b| b.iter(|| tight.check(black_box(&k)).is_err()));
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(30);
    targets = bench_jwt, bench_routes, bench_headers, bench_limiter
}
criterion_main!(benches);
