//! `portcullis demo`: the shipped config, a built-in echo upstream on the address it names, and copy-paste curls.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Starts a small HTTP/1.1 echo server: it answers every request with JSON naming the method, path, query,
/// headers and body size it received. For the demo only.
pub async fn spawn_echo_upstream(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new());
                let _ = b.serve_connection(TokioIo::new(tcp), service_fn(echo)).await;
            });
        }
    });
    Ok(local)
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        headers.insert(k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned().into());
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let size = req.into_body().collect().await.map_or(0, |b| b.to_bytes().len());
    let body = serde_json::json!({"upstream": "portcullis demo echo", "method": method, "path": path, "query": query, "body_bytes": size, "headers": headers});
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    rsp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    Ok(rsp)
}

/// Prints the curl commands that exercise the demo.
pub fn print_guide(https: Option<SocketAddr>, admin: Option<SocketAddr>, token_path: Option<&str>) {
    let base = match https {
        Some(a) => format!("https://{}", display_addr(a)),
        None => "http://127.0.0.1:8080".to_string(),
    };
    println!("\nPortcullis demo is running: {base} -> built-in echo upstream\n");
    println!("# a public route: 200, the upstream echoes what it received (X-Forwarded-*, X-Request-Id)");
    println!("curl -sk {base}/");
    println!("\n# a protected route without a token: 401 with WWW-Authenticate: Bearer");
    println!("curl -sk -i {base}/users/me");
    if let Some(path) = token_path {
        let login = |user: &str, pass: &str| {
            format!("curl -sk -d grant_type=password -d username={user} -d password={pass} {base}{path} | sed -E 's/.*\"access_token\":\"([^\"]+)\".*/\\1/'")
        };
        println!("\n# log in as john.doe (role user) and as admin.user (roles admin, user)");
        println!("USER_TOKEN=$({})", login("john.doe", "securepassword"));
        println!("ADMIN_TOKEN=$({})", login("admin.user", "adminpass"));
        println!("\n# 200: the upstream sees X-Auth-Subject: john.doe");
        println!("curl -sk -H \"Authorization: Bearer $USER_TOKEN\" {base}/users/me");
        println!("\n# 403 for john.doe (no admin role), 200 for admin.user");
        println!("curl -sk -i -H \"Authorization: Bearer $USER_TOKEN\" {base}/admin/stats");
        println!("curl -sk -H \"Authorization: Bearer $ADMIN_TOKEN\" {base}/admin/stats");
        println!("\n# 403 insufficient_scope for john.doe: POST /items needs write:items");
        println!("curl -sk -i -X POST -H \"Authorization: Bearer $USER_TOKEN\" {base}/items");
        println!("\n# a wrong password: 400 invalid_grant");
        println!("curl -sk -i -d grant_type=password -d username=john.doe -d password=nope {base}{path}");
    }
    if let Some(a) = admin {
        println!("\n# health and metrics (admin listener)");
        println!("curl -s http://{}/healthz", display_addr(a));
    }
    println!("\nPress Ctrl-C to stop.\n");
}

fn display_addr(a: SocketAddr) -> String {
    if a.ip().is_unspecified() {
        format!("127.0.0.1:{}", a.port())
    } else {
        a.to_string()
    }
}

/// The shipped config and its demo accounts, built in: `portcullis demo` runs where there is no gateway.toml
/// (a container image carries neither the demo config nor its accounts).
const BUILTIN_CONFIG: &str = include_str!("../../gateway.toml");
const BUILTIN_USERS: &str = include_str!("../../examples/demo-users.toml");
const BUILTIN_CLIENTS: &str = include_str!("../../examples/demo-clients.toml");

/// Writes the built-in demo config and accounts into a fresh folder under the temporary directory (its
/// certificates and keys are generated there at start) and returns the config's path.
pub fn write_builtin_config() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("portcullis-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("examples"))?;
    std::fs::create_dir_all(dir.join("certs"))?;
    std::fs::write(dir.join("examples/demo-users.toml"), BUILTIN_USERS)?;
    std::fs::write(dir.join("examples/demo-clients.toml"), BUILTIN_CLIENTS)?;
    let config = dir.join("gateway.toml");
    std::fs::write(&config, BUILTIN_CONFIG)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_builtin_config_is_complete_and_valid_where_nothing_else_is() {
        let path = super::write_builtin_config().expect("written");
        let config = crate::Config::check(&path).unwrap_or_else(|e| panic!("the built-in demo config does not check: {e}"));
        let te = config.token_endpoint.expect("the demo issues tokens");
        assert!(te.users_file.is_some_and(|f| f.exists()), "the demo accounts are written beside it");
        let _ = std::fs::remove_dir_all(path.parent().expect("a folder"));
    }
}
