//! Findings of an outside review, each as the request that must be refused (and the upstream checked not to have
//! been reached) or the field that must not reach the upstream: paths a second decoding turns into another route,
//! credentials the gateway did not verify, and identity headers of other gateways.

mod common;

use std::time::Duration;

use common::*;

/// Sends one HTTP/1.1 GET with a raw target (no client library re-encodes it) and returns the status.
async fn raw_status(gw: &TestGateway, target: &str, headers: &str) -> u16 {
    let req = format!("GET {target} HTTP/1.1\r\nHost: api.test\r\n{headers}Connection: close\r\n\r\n");
    let (rsp, _) = raw_exchange(gw.http.unwrap(), req.as_bytes(), Duration::from_secs(5)).await;
    rsp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status for {target}: {rsp:?}"))
}

#[tokio::test]
async fn paths_a_second_decoding_would_reroute_are_400_on_every_route_kind_unless_the_route_allows_them() {
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let cfg = ConfigBuilder::new(&up)
            .section(&issuer.config())
            .route("raw", "/raw/*", "auth = \"public\"\nallow_double_encoding = true")
            .route("file", "/files/{name}", "auth = \"public\"")
            .route("admin", "/admin/*", "roles_any = [\"admin\"]")
            .route("public", "/public/*", "auth = \"public\"")
            .route("exact", "/exact", "auth = \"public\"")
            .route("rest", "/*", "auth = \"public\"")
            .build();
        let gw = issuer.gateway(&cfg).await;

        // Single, double and triple encodings of `.`, `/`, `\` and `;`, both cases, with and without trailing
        // parameters; and dot segments carrying an encoded `;`. Under a prefix route, a parameter route and the
        // catch-all (an exact route's literal never matches a path holding an escape).
        let family = [
            "/public/%252e%252e/admin/x",
            "/public/%252E%252E/admin/x",
            "/public/%25252e%25252e/admin/x",
            "/public/%2525252E%2525252E/admin/x",
            "/public/..%252fadmin/x",
            "/public/..%252Fadmin/x",
            "/public/..%25252fadmin/x",
            "/public/%255cadmin",
            "/public/%255Cadmin",
            "/public/x%253Bjsessionid=1",
            "/public/x%253bjsessionid=1",
            "/public/..%3B/admin/x",
            "/public/..%3b/admin/x",
            "/public/.%3B/admin/x",
            "/public/%2e%2e%3b/admin/x",
            "/public/%252e%252e/admin/x?a=1",
            "/public/..%3B/admin/x?a=1;b=2",
            "/files/%252e%252e",
            "/files/..%3B",
            "/exact/..%3B/",
            "/exact%252e",
            "/%252e%252e/admin/x",
        ];
        for target in family {
            let before = up.hits();
            let status = raw_status(&gw, target, "").await;
            assert_eq!(status, 400, "{target}");
            assert_eq!(up.hits(), before, "{target} reached the upstream");
        }

        // What is not a second escape of a delimiter passes: an encoded `%` before other text, a `;` outside a dot
        // segment, a dot segment's plain neighbours.
        for target in ["/public/100%25", "/public/%25ab", "/public/items%3Bv=1", "/public/a%2Bb", "/public/...%3B", "/files/x%252"] {
            let before = up.hits();
            assert_eq!(raw_status(&gw, target, "").await, 200, "{target}");
            assert_eq!(up.hits(), before + 1, "{target}");
        }

        // A route that allows them forwards them as they came.
        assert_eq!(raw_status(&gw, "/raw/%252e%252e/admin/x", "").await, 200);
        assert_eq!(up.last().unwrap().path_and_query, "/raw/%252e%252e/admin/x");
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn credentials_the_gateway_did_not_verify_never_reach_the_upstream() {
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let cfg = ConfigBuilder::new(&up)
            .section(&issuer.config())
            .route("cookie", "/cookie/*", "token_cookie = \"session\"")
            .route("pass", "/pass/*", "auth = \"public\"\npass_authorization = true")
            .route("public", "/public/*", "auth = \"public\"")
            .route("api", "/*", "")
            .build();
        let gw = issuer.gateway(&cfg).await;
        let c = client(&gw);
        let good = issuer.token("alice", &[]);
        let bearer = format!("Bearer {good}");

        // RFC 6750 §2: one method only. A verified header beside a query or cookie token is a 400, even where the
        // route does not read those: an upstream that does would trust the unverified one.
        for (url, headers) in [
            (gw.http_url("/items?access_token=forged"), vec![("authorization", bearer.as_str())]),
            (gw.http_url("/items?ACCESS.TOKEN=forged"), vec![("authorization", bearer.as_str())]),
            (gw.http_url("/items"), vec![("authorization", bearer.as_str()), ("cookie", "a=1; access_token=forged")]),
            (gw.http_url("/cookie/x"), vec![("authorization", bearer.as_str()), ("cookie", "session=forged")]),
        ] {
            let before = up.hits();
            let a = get_with(&c, &url, &headers).await;
            assert_eq!(a.status, 400, "{url} {headers:?}: {}", a.text());
            assert!(a.text().contains("invalid_request"), "{}", a.text());
            assert_eq!(up.hits(), before, "{url}: the upstream was reached");
        }

        // Public routes: an `Authorization` the gateway did not check (even `alg: none`) is removed, and so are
        // token parameters and token cookies; other cookies and parameters pass.
        let none = format!("Bearer {}.{}.", b64(br#"{"alg":"none"}"#), b64(br#"{"sub":"admin","roles":["admin"]}"#));
        let a = get_with(
            &c,
            &gw.http_url("/public/x?access_token=forged&page=2"),
            &[("authorization", none.as_str()), ("cookie", "theme=dark; access_token=forged")],
        )
        .await;
        assert_eq!(a.status, 200);
        let seen = up.last().unwrap();
        assert!(!seen.headers.contains_key("authorization"), "{:?}", seen.headers);
        assert_eq!(seen.path_and_query, "/public/x?page=2");
        assert_eq!(seen.headers["cookie"], "theme=dark");

        // A route that passes `Authorization` through says so; its upstream checks it itself.
        let a = get_with(&c, &gw.http_url("/pass/x"), &[("authorization", none.as_str())]).await;
        assert_eq!(a.status, 200);
        assert_eq!(up.last().unwrap().headers["authorization"], none.as_str());

        // The verified cookie token goes on (the route reads it); the default-name cookie beside nothing else is
        // no credential on a route that does not read it, and is removed.
        let cookie = format!("session={good}; lang=en");
        let a = get_with(&c, &gw.http_url("/cookie/x"), &[("cookie", cookie.as_str())]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(up.last().unwrap().headers["cookie"], cookie.as_str());
        let a = get_with(&c, &gw.http_url("/items"), &[("authorization", bearer.as_str())]).await;
        assert_eq!(a.status, 200);
        gw.stop().await;
    })
    .await;
}

#[test]
fn pass_authorization_is_only_for_public_routes() {
    let up = Upstream::at("127.0.0.1:9".parse().unwrap());
    let cfg = ConfigBuilder::new(&up).route("r", "/*", "auth = \"public\"").route("p", "/p", "pass_authorization = true").build();
    let err = Config::from_toml(std::path::Path::new("g.toml"), &cfg).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("pass_authorization is for public routes"), "{err}");
}

#[tokio::test]
async fn identity_headers_of_other_gateways_never_reach_the_upstream_unless_turned_off() {
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let forged = [
            ("x-auth-request-user", "admin"),
            ("x-auth-request-email", "admin@example.com"),
            ("x-auth-request-groups", "admins"),
            ("x-remote-user", "admin"),
            ("remote-user", "admin"),
            ("x-forwarded-user", "admin"),
            ("x-forwarded-email", "admin@example.com"),
            ("x-forwarded-groups", "admins"),
            ("x-ms-client-principal-name", "admin"),
            ("x-amzn-oidc-identity", "admin"),
            ("x-tenant-user", "admin"),
            ("x_remote_user", "admin"),
        ];
        let cfg = |identity: &str| {
            ConfigBuilder::new(&up)
                .section(&issuer.config())
                .section(identity)
                .route("public", "/public/*", "auth = \"public\"")
                .route("api", "/*", "")
                .build()
        };
        let gw = issuer.gateway(&cfg("[identity]\nstrip_also = [\"X-Tenant-User\"]\n")).await;
        let c = client(&gw);
        let token = issuer.token("alice", &[]);
        let bearer = format!("Bearer {token}");
        for (url, auth) in [(gw.http_url("/public/x"), None), (gw.http_url("/items"), Some(bearer.as_str()))] {
            let mut headers = forged.to_vec();
            headers.extend(auth.map(|a| ("authorization", a)));
            let a = get_with(&c, &url, &headers).await;
            assert_eq!(a.status, 200, "{url}");
            let seen = up.last().unwrap();
            for (name, _) in forged {
                assert!(
                    !seen.headers.contains_key(name.replace('_', "-").as_str()) && !seen.headers.contains_key(name),
                    "{url}: {name} reached the upstream"
                );
            }
        }
        gw.stop().await;

        // Turned off: the well-known list passes (an upstream behind another trusted gateway), strip_also still holds.
        let gw = issuer.gateway(&cfg("[identity]\nstrip_well_known = false\nstrip_also = [\"X-Tenant-User\"]\n")).await;
        let c = client(&gw);
        let a = get_with(&c, &gw.http_url("/public/x"), &forged).await;
        assert_eq!(a.status, 200);
        let seen = up.last().unwrap();
        assert_eq!(seen.headers["x-auth-request-user"], "admin");
        assert!(!seen.headers.contains_key("x-tenant-user"));
        gw.stop().await;
    })
    .await;
}

/// The P-256 group order, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17,
    0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// `n - s` for a 32-byte big-endian `s < n`: the other valid ECDSA signature of the same message.
fn negate_mod_n(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        out[i] = u8::try_from(d).unwrap();
    }
    out
}

#[tokio::test]
async fn tokens_are_accepted_in_one_spelling_only_and_jwe_parameters_are_refused() {
    use base64::Engine;
    bounded(async {
        let up = spawn_upstream().await;
        let key = test_key(jsonwebtoken::Algorithm::ES256);
        let cfg = ConfigBuilder::new(&up)
            .issuer("es", "https://es.test", &["ES256"], "public_keys = [\"es.pem\"]")
            .route("api", "/*", "")
            .build();
        let gw = spawn_gateway_with_files(&cfg, &[("es.pem", key.public_pem.as_bytes())]).await;
        let c = client(&gw);
        let url = gw.http_url("/items");
        let send = |t: String| {
            let c = c.clone();
            let url = url.clone();
            async move { get(&c, &url, Some(&t)).await.status }
        };
        let payload = claims("https://es.test", "alice", serde_json::json!({})).to_string();
        // A signature that spells differently in the two alphabets (ECDSA signatures vary: sign until one does).
        let token = (0..100)
            .map(|_| jws(&key, r#"{"alg":"ES256","typ":"JWT"}"#, &payload))
            .find(|t| t.rsplit_once('.').is_some_and(|(_, s)| s.contains(['-', '_'])))
            .unwrap();
        assert_eq!(send(token.clone()).await, 200);
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let sig_bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).unwrap();

        // Other spellings of the same signature: the standard alphabet with padding, base64url with padding, and
        // non-zero trailing bits (86 characters carry 64 bytes and 4 spare bits).
        let mut trailing = sig.to_string();
        let last = trailing.pop().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let i = alphabet.find(last).unwrap();
        trailing.push(alphabet.as_bytes()[i ^ 1] as char);
        // Also: the signature with a byte more, and one longer than any supported key's (decoded on the stack).
        let longer = [sig_bytes.as_slice(), &[0]].concat();
        let huge = sig_bytes.iter().copied().cycle().take(2_000).collect::<Vec<u8>>();
        for (what, spelled) in [
            ("a byte more", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&longer)),
            ("2,000 bytes", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&huge)),
            ("standard alphabet", base64::engine::general_purpose::STANDARD_NO_PAD.encode(&sig_bytes)),
            ("standard alphabet, padded", base64::engine::general_purpose::STANDARD.encode(&sig_bytes)),
            ("base64url, padded", base64::engine::general_purpose::URL_SAFE.encode(&sig_bytes)),
            ("non-zero trailing bits", trailing),
        ] {
            let before = up.hits();
            assert_eq!(send(format!("{signed}.{spelled}")).await, 401, "{what}");
            assert_eq!(up.hits(), before, "{what}: the upstream was reached");
        }

        // A JWS whose header carries JWE-only parameters, properly signed.
        for header in [r#"{"alg":"ES256","enc":"A256GCM"}"#, r#"{"alg":"ES256","zip":"DEF"}"#, r#"{"alg":"ES256","p2c":1000}"#] {
            let before = up.hits();
            assert_eq!(send(jws(&key, header, &payload)).await, 401, "{header}");
            assert_eq!(up.hits(), before, "{header}");
        }

        // The high-S twin (s -> n - s) verifies as ECDSA, and identity providers that do not normalise S issue such
        // signatures half the time, so it is accepted: the documented policy (docs/security.md). It only re-spells
        // a token already issued, and the gateway keys nothing on a token's spelling but its cache.
        let (r, s) = sig_bytes.split_at(32);
        let twin = [r, &negate_mod_n(s)].concat();
        assert_ne!(twin, sig_bytes);
        let twin = format!("{signed}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&twin));
        assert_eq!(send(twin).await, 200);
        gw.stop().await;
    })
    .await;
}

/// An upstream that accepts connections, counts them, reads what comes and never answers.
async fn sink_upstream() -> (std::net::SocketAddr, tokio::sync::watch::Receiver<usize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            tx.send_modify(|n| *n += 1);
            held.push(tokio::spawn(async move {
                let mut tcp = tcp;
                let mut buf = [0u8; 4096];
                while tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await.is_ok_and(|n| n > 0) {}
            }));
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_cannot_make_the_gateway_hold_upstream_connections_without_bound() {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    bounded(async {
        let up = spawn_upstream().await;
        let (sink, accepted) = sink_upstream().await;
        let cfg = ConfigBuilder::new(&up)
            .section("[limits]\nmax_requests_per_client = 16\ndrain_timeout = \"1s\"\n")
            .section(&format!(
                "[upstreams.sink]\nurl = \"http://{sink}\"\nmax_connections = 8\nqueue_timeout = \"300ms\"\ntimeout = \"60s\""
            ))
            .route_to("sink", "upload", "/upload/*", "auth = \"public\"")
            .route("rest", "/*", "auth = \"public\"")
            .build();
        let gw = spawn_gateway(&cfg).await;
        let addr = gw.http.unwrap();

        // The attack's shape: 4 HTTP/2 connections with 30 uploading streams each whose bodies never end.
        let mut senders = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..4 {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (h2, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            for _ in 0..30 {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Frame<bytes::Bytes>, std::convert::Infallible>>();
                tx.send(Ok(Frame::data(bytes::Bytes::from_static(b"part of an upload that never ends")))).unwrap();
                senders.push(tx);
                let frames = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
                let req = http::Request::post(format!("http://{addr}/upload/x")).body(StreamBody::new(Box::pin(frames))).unwrap();
                let mut h2 = h2.clone();
                answers.push(tokio::spawn(async move {
                    h2.ready().await.ok()?;
                    h2.send_request(req).await.ok().map(|r| r.status().as_u16())
                }));
            }
        }
        // Every stream over the client's 16 is refused at once; of those 16, the upstream's 8 places are held and
        // the other 8 wait their 300 ms and get 503.
        let mut statuses = std::collections::BTreeMap::new();
        let mut pending = 0;
        let settled = tokio::time::Instant::now() + Duration::from_secs(3);
        for a in answers {
            match tokio::time::timeout_at(settled, a).await {
                Ok(Ok(Some(status))) => *statuses.entry(status).or_insert(0) += 1,
                Ok(_) => panic!("a stream failed without an answer"),
                Err(_) => pending += 1,
            }
        }
        assert_eq!(statuses.get(&429), Some(&104), "{statuses:?}");
        assert_eq!(statuses.get(&503), Some(&8), "{statuses:?}");
        assert_eq!(pending, 8, "the streams holding the upstream's places");
        assert!(*accepted.borrow() <= 8, "the gateway opened {} connections to the upstream", *accepted.borrow());

        // Meanwhile another client is served at once.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut other = socket.connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut other, b"GET /ok HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut rsp = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_end(&mut other, &mut rsp)).await.unwrap().unwrap();
        assert!(rsp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&rsp));

        let c = client(&gw);
        let m = metrics(&c, &gw).await;
        assert_eq!(metric(&m, "portcullis_rate_limited_total", &[("key", "client_concurrency"), ("route", "-")]), Some(104.0), "{m}");
        assert_eq!(metric(&m, "portcullis_upstream_errors_total", &[("kind", "saturated"), ("upstream", "sink")]), Some(8.0), "{m}");
        drop(senders);
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn http2_protocol_errors_get_goaway_and_are_counted_and_odd_schemes_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(async {
        let up = spawn_upstream().await;
        let gw = spawn_gateway(&public_config(&up, "")).await;
        const GOAWAY_PROTOCOL_ERROR: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let read_all = |mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>| async move {
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
            out
        };

        // A connection that chose h2 and then sends no preface: the server's SETTINGS, then GOAWAY(PROTOCOL_ERROR).
        let mut tls = gateway_tls(&gw, &[b"h2"]).await;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n").await.unwrap();
        let got = read_all(tls).await;
        assert!(got.windows(17).any(|w| w == GOAWAY_PROTOCOL_ERROR), "{got:?}");

        // A right preface, then a HEADERS frame on stream 0 (a connection error): GOAWAY, and counted.
        for _ in 0..3 {
            let mut tls = gateway_tls(&gw, &[b"h2"]).await;
            tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
            tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            tls.write_all(&[0, 0, 0, 1, 5, 0, 0, 0, 0]).await.unwrap();
            let got = read_all(tls).await;
            assert!(got.windows(17).any(|w| w[3] == 7 && w[13..] == [0, 0, 0, 1]), "{got:?}");
        }
        let c = client(&gw);
        let m = metrics(&c, &gw).await;
        assert_eq!(metric(&m, "portcullis_http2_protocol_errors_total", &[("reason", "PROTOCOL_ERROR")]), Some(4.0), "{m}");

        // `:scheme` is http or https; anything else is refused before the upstream.
        let tcp = tokio::net::TcpStream::connect(gw.http.unwrap()).await.unwrap();
        let (mut h2, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        for (scheme, want) in [("ftp", 400), ("javascript", 400), ("http", 200)] {
            let before = up.hits();
            let req = http::Request::get(format!("{scheme}://api.test/x")).body(empty()).unwrap();
            let status = h2.send_request(req).await.map(|r| r.status().as_u16());
            assert_eq!(status.ok(), Some(want), "{scheme}");
            assert_eq!(up.hits(), before + usize::from(want == 200), "{scheme}");
        }
        gw.stop().await;
    })
    .await;
}
