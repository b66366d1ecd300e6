//! `portcullis demo` end to end: the real binary runs the shipped `gateway.toml` (its listeners and echo upstream
//! moved to free ports, its files in a temporary directory), and every curl command the demo prints is then run
//! exactly as printed, by bash and curl, and its answer checked against what the guide's comment above it
//! promises. A command added to the guide without an expectation here fails the test.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// What a printed command's output must contain, found by a piece of the command's text (the whole command when
/// the piece ends in `/`).
const EXPECTED: &[(&str, &[&str])] = &[
    // The public route: the echo upstream saw the forwarding fields and the request id.
    ("curl -sk https://127.0.0.1:PORT/", &["portcullis demo echo", "\"x-forwarded-proto\":\"https\"", "\"x-request-id\""]),
    ("curl -sk -i https://127.0.0.1:PORT/users/me", &[" 401", "www-authenticate: Bearer"]),
    ("Bearer $USER_TOKEN\" https://127.0.0.1:PORT/users/me", &["portcullis demo echo", "\"x-auth-subject\":\"john.doe\""]),
    ("-i -H \"Authorization: Bearer $USER_TOKEN\" https://127.0.0.1:PORT/admin/stats", &[" 403"]),
    ("Bearer $ADMIN_TOKEN\" https://127.0.0.1:PORT/admin/stats", &["portcullis demo echo", "\"x-auth-subject\":\"admin.user\""]),
    ("-X POST", &[" 403", "insufficient_scope"]),
    ("password=nope", &[" 400", "invalid_grant"]),
    ("/healthz", &["\"status\":\"ok\""]),
];

/// Stops the demo with SIGTERM (a graceful drain) and returns whether it exited 0 within the drain timeout.
fn terminate(mut demo: Child) -> bool {
    let pid = demo.id();
    // bash's own `kill`: no procps needed.
    let kill = |signal: &str| Command::new("bash").args(["-c", &format!("kill -{signal} {pid}")]).status();
    let _ = kill("TERM");
    // Its exit is the signal: waited for on a thread of its own, so the wait can have a deadline.
    let (exited, exit) = mpsc::channel();
    std::thread::spawn(move || exited.send(demo.wait()));
    match exit.recv_timeout(Duration::from_secs(30)) {
        Ok(status) => status.is_ok_and(|s| s.success()),
        Err(_) => {
            // Not yet reaped (the thread still waits on it), so the pid is still the demo's.
            let _ = kill("KILL");
            false
        }
    }
}

#[test]
fn the_demo_answers_every_curl_command_it_prints() {
    assert!(Command::new("curl").arg("--version").output().is_ok(), "curl is needed for this test (.ci/run installs it)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("examples")).unwrap();
    for f in ["demo-users.toml", "demo-clients.toml"] {
        std::fs::copy(manifest("examples").join(f), dir.path().join("examples").join(f)).unwrap();
    }
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, shipped_config(&format!("http://127.0.0.1:{}", free_port()))).unwrap();
    let log = std::fs::File::create(dir.path().join("demo.log")).unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["demo", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("portcullis runs");

    // The guide is printed once everything listens; its last line is the readiness signal.
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.starts_with("Press Ctrl-C");
            let _ = tx.send(line);
            if done {
                break;
            }
        }
    });
    let mut guide = Vec::new();
    while !guide.last().is_some_and(|l: &String| l.starts_with("Press Ctrl-C")) {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => guide.push(line),
            Err(_) => {
                let _ = demo.kill();
                let log = std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();
                panic!("the demo printed no complete guide within 60 s; so far: {guide:#?}\nlog:\n{log}");
            }
        }
    }

    // Every command as printed (the token assignments too); each curl's answer is marked so it can be checked on
    // its own.
    let commands: Vec<&String> = guide.iter().filter(|l| l.starts_with("curl ") || l.contains("=$(curl ")).collect();
    let mut script = String::from("set -u\n");
    let mut checked = Vec::new();
    for (i, c) in commands.iter().enumerate() {
        match c.strip_prefix("curl ") {
            Some(args) => {
                script.push_str(&format!("echo '@@@ {i}'\ncurl --max-time 20 {args}\necho\n"));
                checked.push((i, c.as_str()));
            }
            None => {
                script.push_str(c);
                script.push('\n');
            }
        }
    }
    let out = Command::new("bash").arg("-c").arg(&script).output().expect("bash runs");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let stopped_cleanly = terminate(demo);

    let port_free = |c: &str| {
        // The expectations name the listener as 127.0.0.1:PORT.
        let mut s = c.to_string();
        for w in c.split(['/', ' ', '"']) {
            if let Some(port) = w.strip_prefix("127.0.0.1:") {
                s = s.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:PORT");
            }
        }
        s
    };
    let mut used = vec![false; EXPECTED.len()];
    for (i, c) in checked {
        let answer = out.split(&format!("@@@ {i}\n")).nth(1).map(|s| s.split("@@@ ").next().unwrap_or(s)).unwrap_or("");
        let c = port_free(c);
        // The most specific expectation whose piece is in the command.
        let (k, (_, wanted)) = EXPECTED
            .iter()
            .enumerate()
            .filter(|(_, (piece, _))| if piece.ends_with('/') { c == *piece } else { c.contains(piece) })
            .max_by_key(|(_, (piece, _))| piece.len())
            .unwrap_or_else(|| panic!("no expectation for the printed command {c:?}"));
        used[k] = true;
        for w in *wanted {
            assert!(answer.to_ascii_lowercase().contains(&w.to_ascii_lowercase()), "{c}\nanswered:\n{answer}\nwithout {w:?}");
        }
    }
    assert!(
        used.iter().all(|u| *u),
        "the demo no longer prints a command for {:?}",
        EXPECTED.iter().zip(&used).filter(|(_, u)| !**u).map(|(e, _)| e.0).collect::<Vec<_>>()
    );
    assert!(stopped_cleanly, "the demo did not exit 0 on SIGTERM");
}
