//! Token sources besides the Authorization header: a cookie (per route or `[auth]`), and a query parameter only
//! where a route opts in, removed before forwarding.
mod common;
use bytes::Bytes;
use common::*;
use http_body_util::Full;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-token-sources";

fn config(up: &Upstream) -> String {
    ConfigBuilder::new(up)
        .section("[auth]\ntoken_cookie = \"session\"")
        // A table of its own, not `.issuer()`: this issuer names no `audiences`.
        .section("[[issuers]]\nid = \"local\"\nissuer = \"https://issuer.test\"\nalgorithms = [\"HS256\"]\nsecret_file = \"hs.secret\"")
        .route("query", "/q/*", r#"token_query = "access_token""#)
        .route("optional", "/opt/*", r#"auth = "optional""#)
        .route("plain", "/*", "")
        .build()
}

#[tokio::test]
async fn cookie_and_opt_in_query_tokens() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway_with_files(&config(&up), &[("hs.secret", SECRET)]).await;
    let c = client(&gw);
    let key = hmac_key(jsonwebtoken::Algorithm::HS256, SECRET);
    let t = mint_token(&key, None, &claims("https://issuer.test", "alice", serde_json::json!({})));

    // A query token where the route opted in: accepted, and gone from what the upstream sees.
    let a = get(&c, &gw.https_url(&format!("/q/x?a=1&access_token={t}&b=2")), None).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["path"], "/q/x?a=1&b=2");
    assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some("alice"));

    // The same on a route that did not opt in: no credential at all.
    let hits = up.hits();
    let a = get(&c, &gw.https_url(&format!("/other?access_token={t}")), None).await;
    assert_eq!(a.status, 401);
    assert_eq!(up.hits(), hits);

    // The [auth] cookie works on every route.
    let req = http::Request::get(gw.https_url("/other"))
        .header("cookie", format!("theme=dark; session={t}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(&c, req).await;
    assert_eq!(a.status, 200, "{}", a.text());

    // Two credentials at once are a 400, and nothing is forwarded.
    let hits = up.hits();
    let req = http::Request::get(gw.https_url("/other"))
        .header("cookie", format!("session={t}"))
        .header("authorization", format!("Bearer {t}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(&c, req).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"], "invalid_request");
    assert_eq!(up.hits(), hits);
    gw.stop().await;
}

/// A GET of `url` with these headers.
fn get_request(url: &str, headers: &[(&str, String)]) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// A forged token (signed with another key), and one signed by the issuer.
fn tokens() -> (String, String) {
    let claims = claims("https://issuer.test", "alice", serde_json::json!({"roles": ["admin"]}));
    let forged = mint_token(&hmac_key(jsonwebtoken::Algorithm::HS256, b"not-the-issuer-secret-not-the-issuer"), None, &claims);
    (forged, mint_token(&hmac_key(jsonwebtoken::Algorithm::HS256, SECRET), None, &claims))
}

#[tokio::test]
async fn whatever_an_upstream_could_read_as_a_token_is_verified_or_removed() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway_with_files(&config(&up), &[("hs.secret", SECRET)]).await;
    let c = client(&gw);
    let (forged, valid) = tokens();

    // Spellings lenient parsers take for the token: verified, so a forged one is refused before the upstream.
    let hits = up.hits();
    for (url, headers) in [
        ("/opt/x", vec![("authorization", format!("Bearer\t{forged}"))]),
        ("/opt/x", vec![("cookie", format!("theme=dark; session ={forged}"))]),
        ("/q/x", vec![("cookie", format!(" session\t= {forged}"))]),
        ("/opt/x", vec![("cookie", format!("SESSION={forged}"))]),
        (&format!("/q/x?ACCESS_TOKEN={forged}"), vec![]),
        (&format!("/q/x?a=1;access_token={forged}"), vec![]),
        // PHP reads '.', a space and a leading space into '_'; PHP, Rack and qs read "name[]" as "name".
        (&format!("/q/x?access.token={forged}"), vec![]),
        (&format!("/q/x?access+token={forged}"), vec![]),
        (&format!("/q/x?%20access_token={forged}"), vec![]),
        (&format!("/q/x?access_token[]={forged}"), vec![]),
        (&format!("/q/x?access_token%5B0%5D={forged}"), vec![]),
        (&format!("/q/x?access%5Btoken={forged}"), vec![]),
        (&format!("/q/x?access_token%00={forged}"), vec![]),
        (&format!("/q/x?access_token%5D={forged}"), vec![]),
    ] {
        let a = send(&c, get_request(&gw.https_url(url), &headers)).await;
        assert_eq!(a.status, 401, "{url} {headers:?}: {}", a.text());
        assert_eq!(a.json()["error"], "invalid_token");
    }
    // Beside a valid header token, a second spelling is a second credential.
    let a =
        send(&c, get_request(&gw.https_url(&format!("/q/x?Access_Token={forged}")), &[("authorization", format!("Bearer {valid}"))])).await;
    assert_eq!(a.status, 400, "{}", a.text());
    // So is one in a spelling only a framework folds into the name, after a valid one.
    for second in ["access.token", "access+token", "access_token[]", "+access_token", "access[token", "access_token%00"] {
        let a = send(&c, get_request(&gw.https_url(&format!("/q/x?access_token={valid}&{second}=unverified")), &[])).await;
        assert_eq!(a.status, 400, "{second}: {}", a.text());
    }
    assert_eq!(up.hits(), hits, "an unverified token reached the upstream");

    // Another scheme on an anonymous request is no credential the policy saw: the upstream does not get it.
    let a = send(&c, get_request(&gw.https_url("/opt/x"), &[("authorization", format!("Token {forged}"))])).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.upstream_header("authorization"), None);
    assert_eq!(a.upstream_header("x-auth-subject"), None);
    // Nor beside a cookie token, which is what was verified.
    let headers = [("authorization", format!("Basic {forged}")), ("cookie", format!("session={valid}"))];
    let a = send(&c, get_request(&gw.https_url("/opt/x"), &headers)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.upstream_header("authorization"), None);
    assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some("alice"));
    // A valid query token in another case is verified and removed like the exact name.
    let a = send(&c, get_request(&gw.https_url(&format!("/q/x?a=1&Access_Token={valid}")), &[])).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["path"], "/q/x?a=1");
    // A verified header token still goes on.
    let a = send(&c, get_request(&gw.https_url("/opt/x"), &[("authorization", format!("Bearer {valid}"))])).await;
    assert_eq!(a.upstream_header("authorization"), Some(format!("Bearer {valid}")));
    gw.stop().await;
}
