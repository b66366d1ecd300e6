//! Deployment artefacts (deploy/), checked without a container daemon: the Dockerfiles' rules.

mod common;

use std::collections::BTreeSet;

use common::*;

fn read(rel: &str) -> String {
    std::fs::read_to_string(manifest(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ------------------------------------------------------------------------------------------------------------
// Dockerfiles.

/// One Dockerfile instruction: its keyword in upper case and its arguments, continuation lines joined.
struct Instruction {
    keyword: String,
    args: String,
}

fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        // Comment lines end nothing, even inside a continuation, as in Docker.
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (keyword, args) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                out.push(Instruction { keyword: keyword.to_ascii_uppercase(), args: args.trim().to_string() });
                current.clear();
            }
        }
    }
    out
}

/// An exec-form (`["a", "b"]`) or shell-form command, as words.
fn command_words(s: &str) -> Vec<String> {
    let s = s.trim();
    if s.starts_with('[') {
        serde_json::from_str(s).unwrap_or_default()
    } else {
        s.split_whitespace().map(str::to_string).collect()
    }
}

/// The sources of a COPY from the build context (none for `COPY --from=…`), without `./` or a trailing `/`.
fn context_sources(i: &Instruction) -> Vec<String> {
    let words: Vec<String> = command_words(&i.args).into_iter().filter(|w| !w.starts_with("--")).collect();
    if i.args.split_whitespace().any(|w| w.starts_with("--from=")) || words.len() < 2 {
        return Vec::new();
    }
    words[..words.len() - 1].iter().map(|w| w.trim_start_matches("./").trim_end_matches('/').to_string()).collect()
}

/// What the build context may give the image: the manifest, the lock file and the sources.
const CONTEXT_ALLOWED: [&str; 3] = ["Cargo.toml", "Cargo.lock", "src"];

/// Every rule `text` breaks: numeric non-root USER, a HEALTHCHECK running `portcullis healthcheck`, nothing from
/// the context but the manifest, lock file and sources (no examples/, gateway.toml, certs/ or keys), a dependency
/// layer built before the sources arrive, a stripped binary with its debug info split off, and the runtime's
/// default command.
fn dockerfile_problems(text: &str) -> Vec<String> {
    let all = instructions(text);
    let mut problems = Vec::new();
    let Some(start) = all.iter().rposition(|i| i.keyword == "FROM") else { return vec!["no FROM".into()] };
    let runtime = &all[start..];
    let last = |k: &str| runtime.iter().rev().find(|i| i.keyword == k);

    if runtime[0].args.starts_with("rust") {
        problems.push(format!("the runtime stage runs on the build image {:?}", runtime[0].args));
    }
    let numeric_non_root = |u: &str| {
        let ids: Vec<&str> = u.split(':').collect();
        ids.len() <= 2 && ids.iter().all(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())) && ids[0].parse() != Ok(0u32)
    };
    match last("USER") {
        Some(u) if numeric_non_root(&u.args) => {}
        u => problems.push(format!(
            "USER must be a numeric non-root uid:gid (Kubernetes runAsNonRoot cannot verify a name), not {:?}",
            u.map(|u| &u.args)
        )),
    }
    let healthcheck = last("HEALTHCHECK").and_then(|h| h.args.split_once("CMD").map(|(_, cmd)| command_words(cmd)));
    match healthcheck {
        Some(w) if w.first().is_some_and(|b| b.ends_with("portcullis")) && w.iter().any(|a| a == "healthcheck") => {}
        w => problems.push(format!("HEALTHCHECK must run `portcullis healthcheck`, not {w:?}")),
    }
    for i in &all {
        if i.keyword == "ADD" {
            problems.push(format!("ADD {}: use COPY (ADD fetches URLs and unpacks archives)", i.args));
        }
        if i.keyword == "COPY" {
            for s in context_sources(i) {
                if !CONTEXT_ALLOWED.contains(&s.as_str()) {
                    problems.push(format!(
                        "COPY {s}: only {CONTEXT_ALLOWED:?} may come from the build context (no examples/, gateway.toml, certs/ or keys)"
                    ));
                }
            }
        }
    }
    for i in runtime.iter().filter(|i| i.keyword == "COPY") {
        if !context_sources(i).is_empty() {
            problems.push(format!("COPY {}: the runtime stage takes files from build stages only", i.args));
        }
    }

    let first = |pred: &dyn Fn(&Instruction) -> bool| all.iter().position(pred);
    let lock = first(&|i| i.keyword == "COPY" && context_sources(i).iter().any(|s| s == "Cargo.lock"));
    let deps = first(&|i| i.keyword == "RUN" && (i.args.contains("cargo build") || i.args.contains("cargo fetch")));
    let src = first(&|i| i.keyword == "COPY" && context_sources(i).iter().any(|s| s == "src"));
    if !matches!((lock, deps, src), (Some(l), Some(d), Some(s)) if l < d && d < s) {
        problems
            .push("no dependency-caching stage: COPY Cargo.toml and Cargo.lock, build (or fetch) the dependencies, then COPY src".into());
    }

    let strip = all.iter().find(|i| i.keyword == "RUN" && i.args.contains("--only-keep-debug") && i.args.contains("strip"));
    match strip {
        None => problems.push("the binary is not stripped with its debug info split off (objcopy --only-keep-debug, then strip)".into()),
        Some(strip) => {
            let binary = runtime.iter().find(|i| i.keyword == "COPY" && i.args.contains("--from=") && i.args.contains("portcullis"));
            let from = binary.map(|b| command_words(&b.args).into_iter().find(|w| !w.starts_with("--")).unwrap_or_default());
            if !from.as_ref().is_some_and(|f| strip.args.contains(&format!("-o {f}")) || strip.args.contains(&format!(" {f} "))) {
                problems.push(format!("the runtime's binary {from:?} is not the stripped one"));
            }
        }
    }

    match last("ENTRYPOINT").map(|e| command_words(&e.args)) {
        Some(w) if w.len() == 1 && w[0].ends_with("/portcullis") => {}
        w => problems.push(format!("ENTRYPOINT must be the binary alone, so `docker run IMAGE demo` works, not {w:?}")),
    }
    let cmd = last("CMD").map(|c| command_words(&c.args));
    if cmd.as_deref() != Some(&["run".to_string(), "--config".into(), "/etc/portcullis/gateway.toml".into()][..]) {
        problems.push(format!("CMD must be run --config /etc/portcullis/gateway.toml, not {cmd:?}"));
    }
    problems
}

#[test]
fn both_dockerfiles_are_the_same_and_follow_the_image_rules() {
    let deploy = read("deploy/Dockerfile");
    assert_eq!(read("Dockerfile"), deploy, "the top-level Dockerfile must be a copy of deploy/Dockerfile: cp deploy/Dockerfile Dockerfile");
    let problems = dockerfile_problems(&deploy);
    assert!(problems.is_empty(), "deploy/Dockerfile:\n{}", problems.join("\n"));
    // The context itself keeps local keys, demo accounts and build output out, whatever a later COPY says.
    let ignore: Vec<String> = read(".dockerignore").lines().map(|l| l.trim().to_string()).filter(|l| !l.starts_with('#')).collect();
    assert_eq!(ignore.first().map(String::as_str), Some("*"), ".dockerignore must exclude everything first: {ignore:?}");
    let allowed: BTreeSet<&str> = ignore.iter().filter_map(|l| l.strip_prefix('!')).collect();
    assert_eq!(allowed, CONTEXT_ALLOWED.into_iter().collect(), ".dockerignore lets in more than the image needs");
}

/// The image before issue #26: a named user, no health check, the demo config and accounts copied in, no
/// dependency layer, an unstripped binary.
const OLD_DOCKERFILE: &str = r#"
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin portcullis

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/portcullis portcullis \
    && mkdir -p /etc/portcullis && chown portcullis /etc/portcullis
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
COPY gateway.toml /etc/portcullis/gateway.toml
COPY examples /etc/portcullis/examples
USER portcullis
WORKDIR /etc/portcullis
EXPOSE 8443 8080 9090
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/gateway.toml"]
"#;

#[test]
fn the_dockerfile_rules_catch_each_fault_of_the_old_image() {
    let problems = dockerfile_problems(OLD_DOCKERFILE).join("\n");
    for fault in ["USER", "HEALTHCHECK", "COPY examples", "COPY gateway.toml", "COPY benches", "dependency-caching", "stripped"] {
        assert!(problems.contains(fault), "the old Dockerfile's fault {fault:?} went unreported:\n{problems}");
    }
    let ok = read("deploy/Dockerfile");
    let root_user = ok.replace("USER 10001:10001", "USER 0:0");
    assert!(dockerfile_problems(&root_user).iter().any(|p| p.contains("USER")), "USER 0 passed");
    let no_deps_layer = ok.replace("COPY Cargo.toml Cargo.lock ./", "COPY Cargo.toml Cargo.lock src ./");
    assert!(
        dockerfile_problems(&no_deps_layer).iter().any(|p| p.contains("dependency-caching")),
        "sources before the dependency build passed"
    );
}
