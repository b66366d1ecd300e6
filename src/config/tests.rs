use super::validate::{is_serialized_origin, lenient_ipv4, origin_host};
use super::*;

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert!(parse_duration("5 parsecs").is_err());
    assert!(parse_duration("").is_err());
    assert_eq!(parse_size("64KiB"), Ok(65536));
    assert_eq!(parse_size("10MiB"), Ok(10 << 20));
    assert!(parse_size("10XB").is_err());
}

#[test]
fn one_iss_may_be_configured_only_once() {
    let issuer =
        |id: &str| format!("[[issuers]]\nid = \"{id}\"\nissuer = \"https://idp.test\"\nalgorithms = [\"HS256\"]\nsecret_env = \"PATH\"\n");
    let text = format!("[listen]\nhttp = \"127.0.0.1:0\"\n{}{}", issuer("a"), issuer("b"));
    let err = Config::from_toml(Path::new("dup.toml"), &text).expect_err("duplicate iss must not load").to_string();
    assert!(err.contains("configured twice"), "{err}");
}

#[test]
fn case_insensitive_paths_must_be_ascii() {
    let text = |path: &str, ci: bool| {
        format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\n[routing]\ncase_insensitive = {ci}\n[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n\
                 [[routes]]\nname = \"r\"\npath = \"{path}\"\nupstream = \"a\"\nauth = \"public\"\n"
        )
    };
    let e = Config::from_toml(Path::new("g.toml"), &text("/café/*", true)).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("must be ASCII"), "{e}");
    Config::from_toml(Path::new("g.toml"), &text("/café/*", false)).expect("case-sensitive non-ASCII");
    Config::from_toml(Path::new("g.toml"), &text("/cafe/*", true)).expect("case-insensitive ASCII");
}

#[test]
fn upstream_hosts_are_compared_as_resolvers_read_them() {
    assert_eq!(lenient_ipv4("127.1"), Some(std::net::Ipv4Addr::new(127, 0, 0, 1)));
    assert_eq!(lenient_ipv4("0x7f.0.0.1"), Some(std::net::Ipv4Addr::new(127, 0, 0, 1)));
    assert_eq!(lenient_ipv4("017700000001"), Some(std::net::Ipv4Addr::new(127, 0, 0, 1)));
    assert_eq!(lenient_ipv4("10.1.2"), Some(std::net::Ipv4Addr::new(10, 1, 0, 2)));
    for bad in ["api", "1..2", "256.1.1.1", "1.2.3.4.5", "0x", "+1.2.3.4", "1.2.3.256", ""] {
        assert_eq!(lenient_ipv4(bad), None, "{bad}");
    }
    assert_eq!(origin_host("api.internal."), "api.internal");
    assert_eq!(origin_host("[::1]"), "loopback");
    assert_eq!(origin_host("10.000.0.1"), "10.0.0.1");
}

#[test]
fn a_stripping_route_may_not_forward_into_stricter_routes_of_its_upstream() {
    let load = |routes: &str| {
        let text = format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n[upstreams.b]\nurl = \"http://127.0.0.1:1\"\n\
                 [upstreams.other]\nurl = \"http://127.0.0.1:2\"\n[[issuers]]\nid = \"i\"\nissuer = \"https://idp.test\"\n\
                 algorithms = [\"HS256\"]\nsecret_env = \"PATH\"\n{routes}"
        );
        Config::from_toml(Path::new("g.toml"), &text).map(|_| ()).map_err(|e| e.to_string())
    };
    let route = |name: &str, path: &str, up: &str, rest: &str| {
        format!("[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nupstream = \"{up}\"\n{rest}\n")
    };
    let admin = route("admin", "/admin/*", "a", "roles_any = [\"admin\"]");
    let profile = route("profile", "/users/{id}", "a", "claims = { sub = \"{id}\" }\nbypass_roles = [\"admin\"]");

    // Any token, stripped to "/*", on the same upstream, or on another name for the same origin: refused.
    for up in ["a", "b"] {
        let e = load(&format!("{admin}{}", route("api", "/api/*", up, "strip_prefix = \"/api\""))).expect_err("a bypass must not load");
        assert!(e.contains("route \"api\" strips \"/api\"") && e.contains("route \"admin\" (\"/admin/*\")"), "{e}");
    }
    // Public, stripped to "/users/{id}": refused (the claim rule is skipped); an admin-only route may (admins bypass it).
    let e = load(&format!("{profile}{}", route("v2", "/v2/users/*", "a", "auth = \"public\"\nstrip_prefix = \"/v2\""))).unwrap_err();
    assert!(e.contains("\"profile\""), "{e}");
    load(&format!("{profile}{}", route("v2", "/v2/users/*", "a", "roles_any = [\"admin\"]\nstrip_prefix = \"/v2\"")))
        .expect("admins bypass the claim");

    // Two stripping routes compare what each forwards: public "/up/x" and token-only "/pup/x" both reach "/x".
    let pup = route("pup", "/pup/*", "a", "strip_prefix = \"/pup\"");
    let e = load(&format!("{pup}{}", route("up", "/up/*", "a", "auth = \"public\"\nstrip_prefix = \"/up\""))).unwrap_err();
    assert!(e.contains("route \"up\" strips") && e.contains("\"pup\""), "{e}");

    // The same server under another spelling, and a trailing slash, do not escape the check.
    for host in ["localhost", "127.1", "0x7f.0.0.1", "2130706433", "[::ffff:127.0.0.1]", "0.0.0.0", "127.0.0.1.", "LocalHost"] {
        let spelled = format!("[upstreams.c]\nurl = \"http://{host}:1/\"\n");
        let e = load(&format!("{admin}{}{spelled}", route("api", "/api/*", "c", "strip_prefix = \"/api\""))).expect_err(host);
        assert!(e.contains("\"admin\""), "{host}: {e}");
    }
    let users = route("users", "/users", "a", "roles_any = [\"admin\"]");
    let e = load(&format!("{users}{}", route("v1", "/v1/users/", "a", "strip_prefix = \"/v1\""))).unwrap_err();
    assert!(e.contains("\"users\""), "{e}");
    // A public route may not strip into an optional one: it passes on tokens the optional route would refuse.
    let maybe = route("maybe", "/maybe/*", "a", "auth = \"optional\"");
    assert!(load(&format!("{maybe}{}", route("p", "/p/*", "a", "auth = \"public\"\nstrip_prefix = \"/p\""))).is_err());
    load(&format!("{maybe}{}", route("r", "/r/*", "a", "strip_prefix = \"/r\""))).expect("a token route into an optional one");

    // Allowed: another origin; paths that cannot meet; rules as strict or stricter; a weaker route.
    load(&format!("{admin}{}", route("api", "/api/*", "other", "strip_prefix = \"/api\""))).expect("another origin");
    let elsewhere = "[upstreams.c]\nurl = \"http://10.0.0.1:1/\"\n";
    load(&format!("{admin}{}{elsewhere}", route("api", "/api/*", "c", "strip_prefix = \"/api\""))).expect("another host");
    load(&format!("{admin}{}", route("api", "/api/items/*", "a", "strip_prefix = \"/api\""))).expect("stripped into /items/* only");
    load(&format!("{admin}{}", route("api", "/api/*", "a", "roles_all = [\"admin\", \"ops\"]\nstrip_prefix = \"/api\"")))
        .expect("stricter rules");
    let public = route("public", "/public/*", "a", "auth = \"public\"");
    load(&format!("{public}{}", route("v1", "/v1/*", "a", "strip_prefix = \"/v1\""))).expect("into a public route");
    // A prefix the route's paths never start with strips nothing.
    load(&format!("{admin}{}", route("api", "/api/*", "a", "strip_prefix = \"/apx\""))).expect("nothing stripped");
}

#[test]
fn zero_timeouts_do_not_load() {
    for key in ["idle_timeout", "header_read_timeout"] {
        let text = format!("[listen]\nhttp = \"127.0.0.1:0\"\n[limits]\n{key} = \"0s\"\n");
        let e = Config::from_toml(Path::new("g.toml"), &text).map(|_| ()).expect_err("a zero timeout").to_string();
        assert!(e.contains(key), "{e}");
    }
}

#[test]
fn limits_server_listen_and_identity_errors_are_located_at_their_key() {
    let text = "[listen]\nadmin = \"127.0.0.1:0\"\n[limits]\nmax_connections = 0\nidle_timeout = \"0s\"\n\
                    [server]\nworker_threads = 0\n[rate_limit]\nipv6_prefix = 129\n[identity]\nheaders = { \"bad name\" = \"sub\" }\n";
    let err = Config::from_toml(Path::new("g.toml"), text).map(|_| ()).expect_err("five mistakes");
    let at = |needle: &str| {
        let p = err.problems().iter().find(|p| p.message.contains(needle)).unwrap_or_else(|| panic!("no problem about {needle}: {err}"));
        (p.line, p.column)
    };
    assert_eq!(at("needs `https` or `http`"), (1, 1));
    assert_eq!(at("max_connections"), (4, 19));
    assert_eq!(at("idle_timeout"), (5, 16));
    assert_eq!(at("worker_threads"), (7, 18));
    assert_eq!(at("ipv6_prefix"), (9, 15));
    assert_eq!(at("header name"), (11, 13));
}

#[test]
fn cors_origins_must_be_written_as_browsers_send_them() {
    for ok in ["https://app.example.com", "http://localhost:3000", "https://[::1]:8443", "http://[::1]", "capacitor://localhost"] {
        assert!(is_serialized_origin(ok), "{ok}");
    }
    for bad in [
        "https://app.example.com/",
        "https://app.example.com/path",
        "https://APP.example.com",
        "HTTPS://app.example.com",
        "https://app.example.com:443",
        "http://app.example.com:80",
        "https://*.example.com",
        "https://a.com, https://b.com",
        "file://",
        "app.example.com",
    ] {
        assert!(!is_serialized_origin(bad), "{bad}");
    }
}

#[test]
fn the_forwarded_header_is_one_of_two_fields() {
    let load = |h: &str| {
        Config::from_toml(Path::new("g.toml"), &format!("[listen]\nhttp = \"127.0.0.1:0\"\n[rate_limit]\nforwarded_header = \"{h}\"\n"))
    };
    assert_eq!(load("Forwarded").map(|c| c.forwarded_from).ok(), Some(crate::edge::client_addr::ForwardedFrom::Forwarded));
    assert_eq!(load("x-forwarded-for").map(|c| c.forwarded_from).ok(), Some(crate::edge::client_addr::ForwardedFrom::XForwardedFor));
    let e = load("x-real-ip").map(|_| ()).expect_err("another field").to_string();
    assert!(e.contains("forwarded_header"), "{e}");
}

#[test]
fn an_ipv6_prefix_longer_than_an_address_does_not_load() {
    let load =
        |n: u32| Config::from_toml(Path::new("g.toml"), &format!("[listen]\nhttp = \"127.0.0.1:0\"\n[rate_limit]\nipv6_prefix = {n}\n"));
    assert!(load(128).is_ok());
    let e = load(129).map(|_| ()).expect_err("129 bits").to_string();
    assert!(e.contains("ipv6_prefix 129"), "{e}");
}

#[test]
fn an_identity_provider_without_audiences_is_warned_about() {
    let load = |audiences: &str| {
        let text = format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\n[[issuers]]\nid = \"idp\"\nissuer = \"https://idp.test\"\n\
                 algorithms = [\"RS256\"]\njwks_url = \"https://idp.test/keys\"\n{audiences}"
        );
        Config::from_toml(Path::new("g.toml"), &text).expect("loads").warnings.iter().map(|w| w.message.clone()).collect::<Vec<_>>()
    };
    let w = load("");
    assert!(w.iter().any(|w| w.contains("issuer \"idp\" has no `audiences`") && w.contains("ID tokens")), "{w:?}");
    assert!(load("audiences = [\"api\"]").is_empty());
}

#[test]
fn a_subject_limit_on_a_public_route_is_warned_about() {
    let load = |auth: &str, key: &str| {
        let text = format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n[[issuers]]\nid = \"i\"\n\
                 issuer = \"https://i.test\"\naudiences = [\"api\"]\nalgorithms = [\"RS256\"]\njwks_url = \"https://i.test/keys\"\n\
                 [[routes]]\nname = \"r\"\npath = \"/*\"\nupstream = \"api\"\nauth = \"{auth}\"\n\
                 rate_limit = {{ key = \"{key}\", rate = \"1/s\" }}\n"
        );
        Config::from_toml(Path::new("g.toml"), &text).expect("loads").warnings.iter().map(|w| w.message.clone()).collect::<Vec<_>>()
    };
    for key in ["subject", "claim:tenant"] {
        let w = load("public", key);
        assert!(w.iter().any(|w| w.contains("is public") && w.contains("client address")), "{key}: {w:?}");
        assert!(load("required", key).is_empty(), "{key}");
    }
    assert!(load("public", "ip").is_empty());
}

#[test]
fn an_upstream_ca_file_must_be_a_readable_pem_ca_and_only_for_https() {
    let dir = std::env::temp_dir().join(format!("portcullis-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("empty.pem"), "not a certificate\n").expect("write");
    let load = |url: &str, ca: &str| {
        let text = format!("[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.u]\nurl = \"{url}\"\nca_file = \"{ca}\"\n");
        Config::from_toml(&dir.join("gateway.toml"), &text).map(|_| ()).map_err(|e| e.to_string())
    };
    let e = load("http://127.0.0.1:1", "empty.pem").expect_err("ca_file on http");
    assert!(e.contains("https:// upstreams only") && e.contains(":4:7"), "{e}");
    let e = load("https://127.0.0.1:1", "missing.pem").expect_err("unreadable ca_file");
    assert!(e.contains("missing.pem"), "{e}");
    let e = load("https://127.0.0.1:1", "empty.pem").expect_err("a file without certificates");
    assert!(e.contains("no PEM certificate"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("ab\ncd", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
}

#[test]
fn mutated_configs_are_refused_with_locations_never_a_panic() {
    // Seeded edits of the shipped gateway.toml (lines dropped, repeated or swapped; values retyped; stray and
    // non-ASCII characters): `check` either accepts the result or locates every problem in it.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let shipped = std::fs::read_to_string(&path).unwrap();
    assert!(Config::check(&path).is_ok(), "the shipped config checks");
    const PIECES: [&str; 16] = ["\"", "'", "=", "[", "]", "{", "}", ",", "#", "\n", "é", "0", "-1", "\"\"", "true", "[[routes]]\n"];
    let seed = std::env::var("PORTCULLIS_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x2545_F491_4F6C_DD1Du64);
    let mut state = seed | 1;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    };
    let (mut refused, mut accepted) = (0, 0);
    for round in 0..1500 {
        let mut lines: Vec<String> = shipped.lines().map(str::to_string).collect();
        for _ in 0..1 + next(3) {
            let at = next(lines.len());
            match next(6) {
                0 => drop(lines.remove(at)),
                1 => lines.insert(at, lines[at].clone()),
                2 => {
                    let other = next(lines.len());
                    lines.swap(at, other);
                }
                3 => {
                    // A value of another type, or none.
                    if let Some((key, _)) = lines[at].split_once(" = ") {
                        lines[at] = format!("{key} = {}", ["1", "\"x\"", "[]", "{}", "true", "\"10x\"", ""][next(7)]);
                    }
                }
                _ => {
                    let line = &mut lines[at];
                    let mut cut = next(line.len() + 1);
                    while !line.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    line.insert_str(cut, PIECES[next(PIECES.len())]);
                }
            }
        }
        let text = lines.join("\n");
        match Config::parse(&path, &text, false) {
            Ok(_) => accepted += 1,
            Err(ConfigError::Invalid { problems, .. }) => {
                refused += 1;
                let line_count = text.lines().count().max(1);
                assert!(!problems.is_empty(), "round {round}: refused without a problem");
                for p in &problems {
                    assert!(p.line >= 1 && p.line <= line_count + 1 && p.column >= 1, "round {round} (seed {seed}): {p:?} in\n{text}");
                    assert!(!p.message.is_empty(), "round {round}: {p:?}");
                }
            }
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    assert!(refused > 300 && accepted > 100, "refused {refused}, accepted {accepted}: the edits test little");
}

/// The problems of `text`, as (line, message), in the order `check` prints them.
fn problems_of(text: &str) -> Vec<(usize, String)> {
    match Config::parse(Path::new("g.toml"), text, false) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems().iter().map(|p| (p.line, p.message.clone())).collect(),
    }
}

#[test]
fn mistakes_in_several_tables_are_all_reported_in_one_run() {
    let text = "[listen]\nhttp = \"127.0.0.1:0\"\nhtps = \"127.0.0.1:0\"\n\
                [limits]\nmax_connections = \"many\"\n\
                [server]\nworker_threads = 0\n\
                [upstreams.api]\nurl = \"http://127.0.0.1:1\"\n\
                [[routes]]\nname = \"r\"\npath = \"/*\"\nupstream = \"api\"\nauth = \"public\"\nmethod = [\"GET\"]\n";
    let p = problems_of(text);
    assert_eq!(p.len(), 4, "{p:#?}");
    let at = |line: usize| p.iter().find(|(l, _)| *l == line).map(|(_, m)| m.as_str()).unwrap_or_else(|| panic!("line {line}: {p:#?}"));
    assert!(at(3).contains("unknown field `htps`"), "{p:#?}");
    assert!(at(5).contains("invalid type: string \"many\""), "{p:#?}");
    // The tables that deserialized are still validated.
    assert!(at(7).contains("worker_threads"), "{p:#?}");
    assert!(at(15).contains("unknown field `method`"), "{p:#?}");
}

#[test]
fn each_route_upstream_and_issuer_entry_is_deserialized_on_its_own() {
    let text = "[listen]\nhttp = \"127.0.0.1:0\"\n\
                [upstreams.a]\nurl = \"http://127.0.0.1:1\"\ntimeuot = \"1s\"\n\
                [upstreams.b]\nurl = \"http://127.0.0.1:1\"\nconnect_timeout = 5\n\
                [[issuers]]\nid = \"i\"\nissuer = \"https://i.test\"\nalgorithms = [\"HS256\"]\nsecret_env = \"PATH\"\nleway = \"1s\"\n\
                [[issuers]]\nid = \"j\"\nissuer = \"https://j.test\"\nalgorithms = \"HS256\"\nsecret_env = \"PATH\"\n\
                [[routes]]\nname = \"x\"\npath = \"/x\"\nupstream = \"c\"\nauth = \"publik\"\n\
                [[routes]]\nname = \"y\"\npath = \"/y\"\nupstream = \"c\"\nauth = \"public\"\nroles_any = \"admin\"\n";
    let lines: Vec<usize> = problems_of(text).into_iter().map(|(l, _)| l).collect();
    assert_eq!(lines, [5, 8, 14, 18, 24, 30], "{:#?}", problems_of(text));
}

#[test]
fn unknown_top_level_tables_are_each_reported_with_the_tables_there_are() {
    let p = problems_of("[listn]\nhttp = \"127.0.0.1:0\"\n[listen]\nhttp = \"127.0.0.1:0\"\n[limit]\nmax_connections = 1\n");
    assert_eq!(p.len(), 2, "{p:#?}");
    assert_eq!(p[0].0, 1, "{p:#?}");
    assert!(p[0].1.starts_with("unknown field `listn`, expected one of `listen`, `tls`"), "{p:#?}");
    assert!(p[1].1.starts_with("unknown field `limit`"), "{p:#?}");
}

#[test]
fn a_file_that_does_not_parse_is_one_problem() {
    let p = problems_of("[listen\nhttp = \"127.0.0.1:0\"\n[limits]\nmax_connections = \"many\"\nbogus = 1\n");
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(p[0].0, 1, "{p:#?}");
}

#[test]
fn a_missing_listen_table_is_reported_with_the_rest() {
    let p = problems_of("[limits]\nmax_connections = \"many\"\n");
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(p.iter().any(|(_, m)| m.contains("missing field `listen`")), "{p:#?}");
}

#[test]
fn an_upstream_that_failed_is_reported_once_not_by_every_route_naming_it() {
    let routes = "[[routes]]\nname = \"r1\"\npath = \"/a/*\"\nupstream = \"api\"\nauth = \"public\"\n\
                  [[routes]]\nname = \"r2\"\npath = \"/b/*\"\nupstream = \"api\"\nauth = \"public\"\n";
    for (what, upstream) in [
        ("an unknown key", "url = \"http://127.0.0.1:1\"\nretries = 3\n"),
        ("a value of the wrong type", "url = \"http://127.0.0.1:1\"\npreserve_host = \"yes\"\n"),
        ("an invalid url", "url = \"ftp://127.0.0.1:1\"\n"),
    ] {
        let p = problems_of(&format!("[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.api]\n{upstream}{routes}"));
        assert_eq!(p.len(), 1, "{what}: {p:#?}");
        assert!(p[0].0 <= 5, "{what}: reported at the upstream, not at a route: {p:#?}");
    }
    // [upstreams] that is not a table at all: no route is told its upstream is missing either.
    let p = problems_of(&format!("upstreams = 1\n[listen]\nhttp = \"127.0.0.1:0\"\n{routes}"));
    assert_eq!(p.len(), 1, "{p:#?}");
    // A name that is nowhere in the file is still an error.
    let p = problems_of(&format!("[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.apx]\nurl = \"http://127.0.0.1:1\"\n{routes}"));
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(p.iter().all(|(_, m)| m.contains("upstream \"api\" is not defined")), "{p:#?}");
}

#[test]
fn an_issuer_that_failed_is_reported_once_not_by_what_names_it() {
    let rest = "[upstreams.api]\nurl = \"http://127.0.0.1:1\"\n\
                [[routes]]\nname = \"r1\"\npath = \"/a/*\"\nupstream = \"api\"\nissuers = [\"i\"]\n\
                [[routes]]\nname = \"r2\"\npath = \"/b/*\"\nupstream = \"api\"\n\
                [token_endpoint]\nissuer = \"i\"\n";
    for (what, issuer) in [
        ("an unknown key", "algorithms = [\"HS256\"]\nsecret_env = \"PATH\"\nleway = \"1s\"\n"),
        ("a value of the wrong type", "algorithms = \"HS256\"\nsecret_env = \"PATH\"\n"),
        ("an unknown algorithm", "algorithms = [\"HS257\"]\nsecret_env = \"PATH\"\n"),
        ("a key source it may not fetch", "algorithms = [\"RS256\"]\njwks_url = \"http://idp.test/keys\"\naudiences = [\"api\"]\n"),
    ] {
        let text = format!("[listen]\nhttp = \"127.0.0.1:0\"\n[[issuers]]\nid = \"i\"\nissuer = \"https://i.test\"\n{issuer}{rest}");
        let p = problems_of(&text);
        assert_eq!(p.len(), 1, "{what}: {p:#?}");
    }
    // An entry whose id cannot be read may be any issuer: routes needing one are not told none exist.
    let p = problems_of(&format!("[listen]\nhttp = \"127.0.0.1:0\"\n[[issuers]]\nid = 7\nissuer = \"https://i.test\"\n{rest}"));
    assert_eq!(p.len(), 1, "{p:#?}");
}

#[test]
fn every_top_level_table_is_read() {
    // Each name the unknown-key message offers is one the reader takes: a value of the wrong type is a type
    // error in that table, never an unknown key.
    for name in super::file::TABLES {
        let text = if *name == "listen" { "listen = 1\n".to_string() } else { format!("{name} = 1\n[listen]\nhttp = \"127.0.0.1:0\"\n") };
        let p = problems_of(&text);
        assert!(!p.is_empty() && p.iter().all(|(_, m)| !m.contains("unknown field")), "{name}: {p:#?}");
    }
}

#[test]
fn printed_values_read_back_as_the_config_wrote_them() {
    for (d, want) in [
        (Duration::from_millis(1500), "1500ms"),
        (Duration::from_millis(250), "250ms"),
        (Duration::from_secs(30), "30s"),
        (Duration::from_secs(90), "90s"),
        (Duration::from_secs(120), "2m"),
        (Duration::from_secs(3600), "1h"),
        (Duration::from_secs(2 * 86_400), "2d"),
        (Duration::ZERO, "0s"),
    ] {
        assert_eq!(format_duration(d), want);
        assert_eq!(parse_duration(want), Ok(d), "{want}");
    }
    #[derive(serde::Deserialize)]
    struct Auth {
        auth: crate::auth::authz::AuthMode,
    }
    use crate::auth::authz::AuthMode;
    for mode in [AuthMode::Public, AuthMode::Optional, AuthMode::Required] {
        let read: Auth = toml::from_str(&format!("auth = \"{}\"", mode.as_str())).expect("the printed mode reads back");
        assert_eq!(read.auth, mode);
    }
    use jsonwebtoken::Algorithm::*;
    for alg in [HS256, HS384, HS512, ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512, EdDSA] {
        assert_eq!(crate::auth::keys::parse_alg(crate::auth::keys::alg_name(alg)), Some(alg));
    }
}

#[test]
fn a_route_without_its_upstream_is_still_checked_whole() {
    let text = "[listen]\nhttp = \"127.0.0.1:0\"\n\
                [[routes]]\nname = \"r\"\npath = \"/r/*\"\nupstream = \"nowhere\"\nauth = \"public\"\nstrip_prefix = \"r\"\n\
                rate_limit = { key = \"ip\", rate = \"often\" }\n";
    let lines: Vec<usize> = problems_of(text).into_iter().map(|(l, _)| l).collect();
    assert_eq!(lines, [6, 8, 9], "{:#?}", problems_of(text));
}

#[test]
fn tracing_is_checked_and_reported_all_at_once() {
    let text = |table: &str| format!("[listen]\nhttp = \"127.0.0.1:0\"\n[tracing]\n{table}");
    let ok = Config::from_toml(Path::new("g.toml"), &text("otlp_endpoint = \"http://127.0.0.1:4318\"\n")).expect("loads");
    let t = ok.tracing.expect("tracing on");
    assert_eq!(t.endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
    assert_eq!((t.sample_ratio, t.service_name.as_str(), t.max_queue), (1.0, "portcullis", 8192));
    assert_eq!(t.trust_incoming, crate::telemetry::TrustIncoming::TrustedProxies);
    let full =
        Config::from_toml(Path::new("g.toml"), &text("otlp_endpoint = \"https://otel.example/custom/path\"\ntrust_incoming = \"all\"\n"))
            .expect("loads");
    assert_eq!(full.tracing.expect("on").endpoint.to_string(), "https://otel.example/custom/path");

    let bad = "otlp_endpoint = \"grpc://collector:4317\"\nsample_ratio = 1.5\nservice_name = \" \"\nmax_queue_spans = 0\n";
    let e = Config::from_toml(Path::new("g.toml"), &text(bad)).map(|_| ()).unwrap_err().to_string();
    for want in [
        "g.toml:4:",
        "must be an http:// or https:// URL",
        "g.toml:5:",
        "between 0.0 and 1.0",
        "g.toml:6:",
        "must not be empty",
        "g.toml:7:",
        "at least 1",
    ] {
        assert!(e.contains(want), "{want:?} missing in:\n{e}");
    }
    let e = Config::from_toml(Path::new("g.toml"), &text("otlp_endpoint = \"http://c\"\ntrust_incoming = \"some\"\n"))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("trust_incoming") || e.contains("unknown variant"), "{e}");
    Config::from_toml(Path::new("g.toml"), "[listen]\nhttp = \"127.0.0.1:0\"\n")
        .map(|c| assert!(c.tracing.is_none()))
        .expect("off by default");
}

#[test]
fn a_public_key_entry_with_an_unknown_key_does_not_load() {
    let dir = std::env::temp_dir().join(format!("portcullis-pk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let text = |entry: &str| {
        format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\n[[issuers]]\nid = \"a\"\nissuer = \"https://idp.test\"\naudiences = [\"api\"]\n\
             algorithms = [\"EdDSA\"]\npublic_keys = [{entry}]\n"
        )
    };
    let e = Config::from_toml(&dir.join("g.toml"), &text("{ path = \"k.pem\", kid = \"k1\", kdi = \"typo\" }"))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("g.toml:8:") && !e.contains("k.pem"), "refused as written, before any file is read: {e}");
    // Without the typo the entry is read (and fails only because the file is not there).
    let e = Config::from_toml(&dir.join("g.toml"), &text("{ path = \"k.pem\", kid = \"k1\" }")).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("k.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
