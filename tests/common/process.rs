//! The real binary as its own process, for what only a process shows: its log lines on stderr, its exit code.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A port that was free a moment ago (bound, read and released), for a peer that another process must be told
/// of before it starts (a listener cannot be handed over).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `portcullis run` as a child process, its stderr read line by line.
pub struct GatewayProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

impl GatewayProcess {
    /// Starts `portcullis <global args> run --config <config>` and waits for its "portcullis started" line, which
    /// names the addresses it listens on (port 0 in the config is fine).
    pub fn run(config: &Path, global_args: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.args(global_args).arg("run").arg("--config").arg(config).env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("portcullis runs");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = GatewayProcess { child, lines, seen: Vec::new(), http: None, admin: None };
        let started = p.wait_line(|l| l.contains("portcullis started"), Duration::from_secs(60));
        p.http = field(&started, "http").and_then(|a| a.parse().ok());
        p.admin = field(&started, "admin").and_then(|a| a.parse().ok());
        p
    }

    /// Waits for a line matching `pred` (among those not yet returned by an earlier wait, or any seen when
    /// `pred` matched none of them before) and returns it.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool, within: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no matching log line within {within:?}; lines so far:\n{}", self.seen.join("\n"));
                }
            }
        }
    }

    /// The exit status, once the process has ended (None while it runs).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of a log line: `name=value` in text, `"name":"value"` in JSON.
pub fn field(line: &str, name: &str) -> Option<String> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        return match v.get(name)? {
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        };
    }
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[at..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        return None;
    }
    Some(rest.split(' ').next().unwrap_or("").to_string())
}
