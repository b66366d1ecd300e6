//! Token sources besides the Authorization header: a cookie (per route or `[auth]`), and a query parameter only
//! where a route opts in, removed before forwarding.
mod common;
use bytes::Bytes;
use common::*;
use http_body_util::Full;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-token-sources";

fn config(up: &Upstream) -> String {
    format!(
        r#"{}
[auth]
token_cookie = "session"

[[issuers]]
id = "local"
issuer = "https://issuer.test"
algorithms = ["HS256"]
secret_file = "hs.secret"

[[routes]]
name = "query"
path = "/q/*"
upstream = "api"
token_query = "access_token"

[[routes]]
name = "plain"
path = "/*"
upstream = "api"
"#,
        base_config(up)
    )
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
