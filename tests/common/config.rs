//! Gateway configs: the base most tests share, and a builder for what a test adds to it.

use super::Upstream;

/// The `[listen]` + `[tls]` header used by most tests: https, http and admin on port 0, self-signed certs; and
/// the `api` upstream.
pub fn base_config(upstream: &Upstream) -> String {
    format!(
        r#"
[listen]
https = "127.0.0.1:0"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tls]
cert = "gateway.crt"
key = "gateway.key"
self_signed = true

[upstreams.api]
url = "{}"
connect_timeout = "1s"
timeout = "5s"
"#,
        upstream.url()
    )
}

/// A route's lines that open it to anyone, with or without a token.
pub const AUTH_PUBLIC: &str = r#"auth = "public""#;

/// The base config, `extra` tables, and one public catch-all route (`all`, `/*`) to the `api` upstream.
pub fn public_config(upstream: &Upstream, extra: &str) -> String {
    ConfigBuilder::new(upstream).section(extra).route("all", "/*", AUTH_PUBLIC).build()
}

/// A gateway config: the [`base_config`], then what a test adds, written out in the order added. Each piece is
/// plain TOML, so a test states only what differs:
///
/// ```ignore
/// ConfigBuilder::new(&up)
///     .issuer("local", "https://hs.test", &["HS256"], r#"secret_file = "hs.secret""#)
///     .route("admin", "/admin/*", r#"roles_any = ["admin"]"#)
///     .route("all", "/*", "")
///     .build()
/// ```
pub struct ConfigBuilder {
    text: String,
}

impl ConfigBuilder {
    pub fn new(upstream: &Upstream) -> ConfigBuilder {
        ConfigBuilder { text: base_config(upstream) }
    }

    /// Any other TOML, as written: whole tables (`[limits]`, `[rate_limit]`, `[cors]`, an issuer table that is not
    /// [`ConfigBuilder::issuer`]'s shape).
    pub fn section(mut self, toml: &str) -> ConfigBuilder {
        self.text.push('\n');
        self.text.push_str(toml);
        self.text.push('\n');
        self
    }

    /// An `[[issuers]]` table: `id`, `issuer` (what tokens name in `iss`), the audience `api`, `algorithms`, and
    /// `rest` (the key source and any other settings, one per line).
    pub fn issuer(self, id: &str, iss: &str, algorithms: &[&str], rest: &str) -> ConfigBuilder {
        let algorithms = algorithms.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
        self.section(&format!("[[issuers]]\nid = \"{id}\"\nissuer = \"{iss}\"\naudiences = [\"api\"]\nalgorithms = [{algorithms}]\n{rest}"))
    }

    /// An upstream besides `api`: `[upstreams.<name>]` with its `url` and `rest` (timeouts, `ca_file`).
    pub fn upstream(self, name: &str, url: &str, rest: &str) -> ConfigBuilder {
        self.section(&format!("[upstreams.{name}]\nurl = \"{url}\"\n{rest}"))
    }

    /// A `[[routes]]` table to the `api` upstream: `name`, `path`, and `rest` (methods, `auth`, rules; one per line).
    pub fn route(self, name: &str, path: &str, rest: &str) -> ConfigBuilder {
        self.route_to("api", name, path, rest)
    }

    /// A `[[routes]]` table to another upstream.
    pub fn route_to(self, upstream: &str, name: &str, path: &str, rest: &str) -> ConfigBuilder {
        self.section(&format!("[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nupstream = \"{upstream}\"\n{rest}"))
    }

    pub fn build(self) -> String {
        self.text
    }
}
