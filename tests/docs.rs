//! Keeps docs/configuration.md true to the config loader, in both directions: every key the loader accepts is
//! documented, and every documented key is accepted.
//!
//! The accepted keys come from the loader itself, not from a list kept here. Every config struct denies unknown
//! fields, and serde's error for one names the fields it expected ("unknown field `x`, expected one of `a`, `b`").
//! So for each table we load a valid config with a bogus key put into that table, and read the list from the error.
//! What this file does list by hand is where each table sits in a config (the probes below); a table the loader
//! gains is caught when it is top-level (the top-level probe lists it), not when it is nested in another table.
//!
//! Only `portcullis::Config` and the public API of its error (`problems()`, Display) are used: the module paths
//! under src/ are not stable.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use portcullis::Config;

/// The key put into a table to make the loader list that table's keys.
const BOGUS: &str = "portcullis_docs_bogus";

/// A config in which every table the loader knows appears, written as standard tables (not inline ones) so a
/// line can be put into any of them. `DIR` is replaced by a folder holding the files it names.
const BASE: &str = r#"
[listen]
https = "127.0.0.1:0"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tls]
cert = "DIR/gateway.crt"
key = "DIR/gateway.key"
self_signed = true

[limits]
max_body_bytes = "1MiB"

[server]
access_log = false

[admin]

[auth]
token_cookie = "session"

[routing]
case_insensitive = false

[rate_limit]
trusted_proxies = ["10.0.0.0/8"]

[rate_limit.global]
key = "ip"
rate = "100/s"

[identity]
forward_authorization = true

[headers]
frame_options = "DENY"

[cors]
allow_origins = ["https://app.example.com"]

[upstreams.api]
url = "http://127.0.0.1:9"

[upstreams.api.health]
path = "/healthz"

[[issuers]]
id = "local"
issuer = "https://gateway.test"
audiences = ["api"]
algorithms = ["HS256"]
secret_file = "DIR/secret"

[token_endpoint]
issuer = "local"
users_file = "DIR/users.toml"
clients_file = "DIR/clients.toml"

[token_endpoint.rate_limit]
rate = "5/min"

[[routes]]
name = "r"
path = "/r/*"
upstream = "api"

[routes.rate_limit]
key = "subject"
rate = "10/s"

[routes.retries]
attempts = 1

[routes.headers]
frame_options = "SAMEORIGIN"

[routes.cors]
allow_origins = ["https://app.example.com"]

[tracing]
otlp_endpoint = "http://127.0.0.1:4318"

[forward_auth]
path = "/auth"

[store]
url = "redis://127.0.0.1:6379/0"
"#;

/// Account files the token endpoint reads. The hash is a well-formed argon2id one (the demo's), so the files load.
const USERS: &str = "[users.\"alice\"]\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$HHk6rYajt9wz8ylHyqxscg$cgyaS5jGgf3kWRSLvX+e10WGdq3tKk0AjLzNd82A8OU\"\n";
const CLIENTS: &str = "[clients.\"app\"]\nsecret_hash = \"$argon2id$v=19$m=19456,t=2,p=1$HHk6rYajt9wz8ylHyqxscg$cgyaS5jGgf3kWRSLvX+e10WGdq3tKk0AjLzNd82A8OU\"\n";

/// Where a table sits: the doc heading that documents it, the file the bogus key goes into, and the line of that
/// file after which it goes ("" = the top of the file).
struct Probe {
    heading: &'static str,
    file: &'static str,
    after: &'static str,
}

const fn probe(heading: &'static str, file: &'static str, after: &'static str) -> Probe {
    Probe { heading, file, after }
}

/// Every table, by the heading of docs/configuration.md that documents it. A route's `headers` and `cors` tables
/// take the global tables' keys, so they are held to those sections.
const PROBES: &[Probe] = &[
    probe("[listen]", "gateway.toml", "[listen]"),
    probe("[tls]", "gateway.toml", "[tls]"),
    probe("[limits]", "gateway.toml", "[limits]"),
    probe("[server]", "gateway.toml", "[server]"),
    probe("[admin]", "gateway.toml", "[admin]"),
    probe("[auth]", "gateway.toml", "[auth]"),
    probe("[routing]", "gateway.toml", "[routing]"),
    probe("[rate_limit]", "gateway.toml", "[rate_limit]"),
    probe("[rate_limit.global]", "gateway.toml", "[rate_limit.global]"),
    probe("[identity]", "gateway.toml", "[identity]"),
    probe("[headers]", "gateway.toml", "[headers]"),
    probe("[cors]", "gateway.toml", "[cors]"),
    probe("[upstreams.NAME]", "gateway.toml", "[upstreams.api]"),
    probe("[upstreams.NAME.health]", "gateway.toml", "[upstreams.api.health]"),
    probe("[[issuers]]", "gateway.toml", "[[issuers]]"),
    probe("[token_endpoint]", "gateway.toml", "[token_endpoint]"),
    probe("[token_endpoint.rate_limit]", "gateway.toml", "[token_endpoint.rate_limit]"),
    probe("[[routes]]", "gateway.toml", "[[routes]]"),
    probe("[routes.rate_limit]", "gateway.toml", "[routes.rate_limit]"),
    probe("[routes.retries]", "gateway.toml", "[routes.retries]"),
    probe("[headers]", "gateway.toml", "[routes.headers]"),
    probe("[cors]", "gateway.toml", "[routes.cors]"),
    probe("[tracing]", "gateway.toml", "[tracing]"),
    probe("[forward_auth]", "gateway.toml", "[forward_auth]"),
    probe("[store]", "gateway.toml", "[store]"),
    probe("[users.NAME]", "users.toml", "[users.\"alice\"]"),
    probe("[clients.NAME]", "clients.toml", "[clients.\"app\"]"),
];

/// The files of a config, written into a fresh folder.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    /// Writes the base files, with the bogus key put into `file` after the line `after`. Returns the config's path
    /// and the 1-based line the bogus key is on.
    fn write(bogus: Option<(&str, &str)>) -> (Files, PathBuf, usize) {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().to_str().expect("a UTF-8 temp dir").to_string();
        let gateway = BASE.replace("DIR", &d);
        let mut bogus_line = 0;
        for (name, text) in [("gateway.toml", gateway.as_str()), ("users.toml", USERS), ("clients.toml", CLIENTS)] {
            let text = match bogus {
                Some((file, after)) if file == name => {
                    let (text, line) = insert_after(text, after, &format!("{BOGUS} = 1"));
                    bogus_line = line;
                    text
                }
                _ => text.to_string(),
            };
            std::fs::write(dir.path().join(name), text).expect("write a config file");
        }
        // An HMAC secret of 32 bytes or more, read from a file so the test needs no environment variable.
        std::fs::write(dir.path().join("secret"), "a test secret that is long enough to be accepted").expect("write the secret");
        let path = dir.path().join("gateway.toml");
        (Files { dir }, path, bogus_line)
    }

    fn config_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.toml")).expect("read the config back")
    }
}

/// Puts `line` after the first line equal to `after` ("" = at the top). Returns the text and the new line's number.
fn insert_after(text: &str, after: &str, line: &str) -> (String, usize) {
    let mut lines: Vec<&str> = text.lines().collect();
    let at = if after.is_empty() {
        0
    } else {
        lines.iter().position(|l| *l == after).unwrap_or_else(|| panic!("no line {after:?} in the probe's file")) + 1
    };
    lines.insert(at, line);
    (lines.join("\n") + "\n", at + 1)
}

/// Loads the base config with the bogus key in one table and returns the keys the loader says that table takes.
fn accepted_keys(file: &str, after: &str) -> BTreeSet<String> {
    let (files, path, line) = Files::write(Some((file, after)));
    let err = match Config::from_toml(&path, &files.config_text()) {
        Ok(_) => panic!("a bogus key after {after:?} in {file} was accepted: is that table still denying unknown fields?"),
        Err(e) => e,
    };
    let problem = err
        .problems()
        .iter()
        .find(|p| p.message.contains(&format!("unknown field `{BOGUS}`")))
        .unwrap_or_else(|| panic!("after {after:?} in {file}: expected an unknown-field error, got:\n{err}"));
    // The account files are reported inside the message, as `file:line:column`; gateway.toml by the problem's line.
    if file == "gateway.toml" {
        assert_eq!(problem.line, line, "the bogus key after {after:?} was reported elsewhere:\n{err}");
    } else {
        assert!(problem.message.contains(&format!("{file}:{line}:")), "the bogus key in {file} was reported elsewhere:\n{err}");
    }
    expected_fields(&problem.message).unwrap_or_else(|| panic!("no expected-field list in {:?}", problem.message))
}

/// Reads serde's list of expected fields: "… expected `a`", "… expected `a` or `b`", "… expected one of `a`, `b`".
fn expected_fields(message: &str) -> Option<BTreeSet<String>> {
    let (_, list) = message.split_once(", expected ")?;
    let names: BTreeSet<String> = list.split('`').skip(1).step_by(2).map(str::to_string).collect();
    (!names.is_empty()).then_some(names)
}

/// The tables of docs/configuration.md: each `## [table]` heading, and the keys its table rows name in their first
/// column, in backticks. Other headings end a table's section; rows elsewhere are ignored.
fn documented_tables(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            let name = heading.split_whitespace().next().unwrap_or("");
            current = name.starts_with('[').then(|| name.to_string());
            if let Some(name) = &current {
                assert!(tables.insert(name.clone(), BTreeSet::new()).is_none(), "docs/configuration.md: {name} has two sections");
            }
            continue;
        }
        let (Some(table), Some(row)) = (&current, line.strip_prefix('|')) else { continue };
        let first = row.split('|').next().unwrap_or("").trim();
        // The header row ("key") and the separator row ("---") hold no backticks.
        let keys = tables.get_mut(table).expect("the current table");
        for key in first.split('`').skip(1).step_by(2) {
            assert!(keys.insert(key.to_string()), "docs/configuration.md: {table} documents `{key}` twice");
        }
    }
    tables
}

#[test]
fn the_base_config_loads() {
    // Without the bogus key the config is valid, so each probe's only problem is the key it adds.
    let (files, path, _) = Files::write(None);
    if let Err(e) = Config::from_toml(&path, &files.config_text()) {
        panic!("the probes' base config does not load:\n{e}");
    }
}

#[test]
fn docs_configuration_documents_every_key_and_only_those() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let doc = std::fs::read_to_string(&doc_path).expect("read docs/configuration.md");
    let documented = documented_tables(&doc);
    let mut wrong = Vec::new();

    // Every top-level key is a table; each has at least one section (`[routes.rate_limit]` counts for `routes`).
    let top = accepted_keys("gateway.toml", "");
    let probed: BTreeSet<String> = PROBES.iter().filter(|p| p.file == "gateway.toml").map(|p| table_root(p.after)).collect();
    for key in top.difference(&probed) {
        wrong.push(format!("top-level table `{key}` is accepted by the loader but has no probe in tests/docs.rs (and maybe no section)"));
    }
    for key in probed.difference(&top) {
        wrong.push(format!("tests/docs.rs probes a top-level table `{key}` the loader does not accept"));
    }

    for p in PROBES {
        let accepted = accepted_keys(p.file, p.after);
        let Some(doc_keys) = documented.get(p.heading) else {
            wrong.push(format!("no `## {}` section in docs/configuration.md (keys: {})", p.heading, list(&accepted)));
            continue;
        };
        for key in accepted.difference(doc_keys) {
            wrong.push(format!("{} (as {}): `{key}` is accepted but not documented", p.heading, p.after));
        }
        for key in doc_keys.difference(&accepted) {
            wrong.push(format!("{} (as {}): `{key}` is documented but not accepted", p.heading, p.after));
        }
    }
    let headings: BTreeSet<&str> = PROBES.iter().map(|p| p.heading).collect();
    for name in documented.keys().filter(|n| !headings.contains(n.as_str())) {
        wrong.push(format!("docs/configuration.md has a section `## {name}` that no table of the loader matches"));
    }
    assert!(wrong.is_empty(), "docs/configuration.md and the config loader disagree:\n  {}", wrong.join("\n  "));
}

/// `[upstreams.api]` -> `upstreams`, `[[routes]]` -> `routes`, `[routes.cors]` -> `routes`.
fn table_root(header: &str) -> String {
    header.trim_matches(|c| c == '[' || c == ']').split('.').next().unwrap_or("").to_string()
}

fn list(keys: &BTreeSet<String>) -> String {
    keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
}

#[test]
fn the_doc_parser_reads_tables_and_the_error_parser_reads_serde() {
    let doc = "# T\n\n## [a]\n| key | type |\n|---|---|\n| `x` | int |\n| `y`, `z` | str |\n\nprose `not_a_key`\n| `w` | row |\n\
               ## Values\n| `v` | not a table |\n## [[b]] (note)\n| `q` | x |\n";
    let t = documented_tables(doc);
    assert_eq!(t.len(), 2);
    assert_eq!(t["[a]"], ["w", "x", "y", "z"].into_iter().map(String::from).collect());
    assert_eq!(t["[[b]]"], ["q"].into_iter().map(String::from).collect());
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(expected_fields("unknown field `x`, expected `a`"), Some(set(&["a"])));
    assert_eq!(expected_fields("unknown field `x`, expected `a` or `b`"), Some(set(&["a", "b"])));
    assert_eq!(expected_fields("unknown field `x`, expected one of `a`, `b`, `c`"), Some(set(&["a", "b", "c"])));
    assert_eq!(expected_fields("unknown field `x`, there are no fields"), None);
}
