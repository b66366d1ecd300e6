mod common;
use common::*;

#[tokio::test]
async fn https_get_reaches_upstream() {
    let up = spawn_upstream().await;
    let cfg = format!("{}\n[[routes]]\nname = \"all\"\npath = \"/*\"\nupstream = \"api\"\nauth = \"public\"\n", base_config(&up));
    let gw = spawn_gateway(&cfg).await;
    let c = client(&gw);
    let a = get(&c, &gw.https_url("/hello?x=1"), None).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["path"], "/hello?x=1");
    assert_eq!(up.hits(), 1);
    let h2 = h2_client(&gw);
    let a = get(&h2, &gw.https_url("/h2"), None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.version, http::Version::HTTP_2);
    gw.stop().await;
}
