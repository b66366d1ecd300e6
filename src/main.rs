//! The `portcullis` command line: a thin layer over the library.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use portcullis::config::{format_duration, parse_duration, Config, ConfigError};

// jemalloc: per-thread caches serve a request's small blocks (header maps, shared buffers) faster than glibc, and
// its background thread gives freed memory back to the OS within about a second (`dirty_decay_ms:1000`,
// `muzzy_decay_ms:0`, set at build time in .cargo/config.toml) even when no request comes to trigger it: after a
// burst of idle connections closes, the resident memory is back near idle within seconds (mimalloc, used before,
// gave it back only once later allocations ran its purge). It also takes the place of glibc's `malloc` for C code
// (feature `unprefixed_malloc_on_supported_platforms`): aws-lc's per-connection TLS state (the AEAD keys) used to
// stay in glibc's heap, about 17 MiB of it resident after 10,000 TLS connections had closed.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const DEFAULT_CONFIG: &str = "gateway.toml";

#[derive(Parser)]
#[command(name = "portcullis", version, about = "A reverse-proxy authentication gateway")]
struct Cli {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log level (RUST_LOG, when set, wins).
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    /// Tokio worker threads (default: [server] worker_threads, else the CPUs this process may run on).
    #[arg(long, env = "PORTCULLIS_WORKERS", global = true)]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway.
    Run {
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Validate a config like `nginx -t`: exit 0 with a summary, or 1 with every error at file:line:column.
    Check {
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Policy test cases to run against the config ([[case]] name, method, path, claims|token, expect).
        #[arg(long)]
        tests: Option<PathBuf>,
    },
    /// Explain how the gateway would answer a request: the route, each rule, and the decision.
    Explain {
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long)]
        path: String,
        /// A token to verify with the configured keys.
        #[arg(long, conflicts_with = "claims")]
        token: Option<String>,
        /// Claims as JSON, taken as verified (signatures are not checked).
        #[arg(long)]
        claims: Option<String>,
        /// The issuer (id) the claims are from when they have no `iss`. Without it, such claims are decided under
        /// each issuer the route accepts, one decision each.
        #[arg(long, requires = "claims")]
        issuer: Option<String>,
    },
    /// Start the gateway on the shipped config with a built-in echo upstream, and print curl commands to try.
    Demo {
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Listen on this address instead of the config's (0.0.0.0 in a container, so `-p` reaches it).
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
    },
    /// Exit 0 when the gateway at URL answers 200 (ready), else 1: a container health check without curl.
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9090/readyz")]
        url: String,
        #[arg(long, default_value = "2s")]
        timeout: String,
    },
    /// Read a password from the terminal (no echo) or stdin and print its argon2id hash.
    HashPassword,
    /// Revoke a token by its jti, or every token of a subject issued before a time ("log out everywhere"): in the
    /// [store] for every replica, else at the running gateway's admin listener.
    Revoke {
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
        /// The token's `jti`.
        #[arg(long, conflicts_with_all = ["sub", "before", "issuer"], required_unless_present = "sub")]
        jti: Option<String>,
        /// The subject whose tokens issued before --before are revoked.
        #[arg(long, requires = "before")]
        sub: Option<String>,
        /// Tokens issued before this time: now, unix seconds, or an RFC 3339 time.
        #[arg(long)]
        before: Option<String>,
        /// Only the subject of this issuer (id); default: of every issuer.
        #[arg(long, requires = "sub")]
        issuer: Option<String>,
        /// When the entry may be forgotten (default: when every token it covers has expired, by the issuers'
        /// max_lifetime).
        #[arg(long)]
        until: Option<String>,
        /// Without a [store]: the admin listener to send it to (default: the config's `listen.admin`).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Mint a token with an issuer's configured key (for tests and scripts).
    Token {
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        sub: String,
        /// Comma-separated roles.
        #[arg(long, default_value = "")]
        roles: String,
        /// Space-separated scopes.
        #[arg(long, default_value = "")]
        scopes: String,
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Demo { .. }) {
        // The shipped config may read an HMAC secret from the environment; give the demo one (before any thread).
        demo_secret();
    }
    let log = init_logging(cli.log_format, &cli.log_level);
    let code = match cli.command {
        Command::Check { config, tests } => check(&config, tests.as_deref()),
        Command::Explain { config, method, path, token, claims, issuer } => explain(&config, &method, &path, token, claims, issuer),
        Command::Run { config } => with_config(&config, cli.workers, |cfg, w| run(cfg, w, false)),
        Command::Demo { config, bind } => match demo_config(config) {
            Ok(config) => with_config(&config, cli.workers, |mut cfg, w| {
                if let Some(ip) = bind {
                    let l = &mut cfg.listen;
                    for addr in [&mut l.https, &mut l.http, &mut l.admin].into_iter().flatten() {
                        addr.set_ip(ip);
                    }
                }
                run(cfg, w, true)
            }),
            Err(e) => {
                eprintln!("cannot write the built-in demo config: {e}");
                ExitCode::from(1)
            }
        },
        Command::HashPassword => hash_password(),
        Command::Revoke { config, jti, sub, before, issuer, until, admin } => revoke(&config, jti, sub, before, issuer, until, admin),
        Command::Healthcheck { url, timeout } => healthcheck(&url, &timeout),
        Command::Token { config, issuer, sub, roles, scopes, ttl } => token(&config, &issuer, &sub, &roles, &scopes, &ttl),
    };
    log.flush_now();
    code
}

/// Logs are buffered and written by a background thread, so a request never waits on stderr.
fn init_logging(format: LogFormat, level: &str) -> portcullis::logging::BufferedStderr {
    // h2 warns once per misbehaving connection: a flood of them would be a log flood. The gateway counts those
    // connections and reports them at most once a minute instead (RUST_LOG can still ask for h2's own lines).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},h2=error")));
    let writer = portcullis::logging::BufferedStderr::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    portcullis::logging::direct_access_lines(matches!(format, LogFormat::Json));
    writer
}

fn demo_secret() {
    if std::env::var_os("PORTCULLIS_JWT_SECRET").is_none() {
        let mut s = String::new();
        for _ in 0..3 {
            s.push_str(portcullis::edge::headers_request::new_request_id().to_str().unwrap_or("portcullis-demo-secret-portcullis"));
        }
        // Single-threaded here: no runtime or other thread exists yet.
        std::env::set_var("PORTCULLIS_JWT_SECRET", s);
    }
}

fn print_config_error(e: &ConfigError) {
    eprintln!("{e}");
}

fn explain(config: &Path, method: &str, path: &str, token: Option<String>, claims: Option<String>, issuer: Option<String>) -> ExitCode {
    let cfg = match Config::check(config) {
        Ok(c) => c,
        Err(e) => {
            print_config_error(&e);
            return ExitCode::from(1);
        }
    };
    let Ok(method) = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
        eprintln!("invalid method {method:?}");
        return ExitCode::from(1);
    };
    let creds = match (token, claims) {
        (Some(t), _) => portcullis::tools::explain::Credentials::Token(t),
        (None, Some(c)) => match serde_json::from_str::<serde_json::Value>(&c) {
            Ok(serde_json::Value::Object(claims)) => portcullis::tools::explain::Credentials::Claims { claims, issuer },
            _ => {
                eprintln!("--claims must be a JSON object");
                return ExitCode::from(1);
            }
        },
        (None, None) => portcullis::tools::explain::Credentials::None,
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return ExitCode::from(1) };
    match rt.block_on(portcullis::tools::explain::explain(&cfg, &method, path, creds)) {
        Ok(decisions) => {
            for l in portcullis::tools::explain::render(&decisions) {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn run_policy_tests(cfg: Config, tests: &Path) -> bool {
    let cases = match portcullis::tools::explain::load_cases(tests) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return false;
        }
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return false };
    let cfg = std::sync::Arc::new(cfg);
    let (lines, ok) = rt.block_on(portcullis::tools::explain::run_cases(&cfg, &cases));
    for l in &lines {
        println!("{l}");
    }
    let failed = lines.iter().filter(|l| l.starts_with("FAIL")).count();
    println!("policy tests: {} passed, {failed} failed", lines.len() - failed);
    ok
}

fn check(path: &Path, tests: Option<&Path>) -> ExitCode {
    match Config::check(path) {
        Err(e) => {
            print_config_error(&e);
            eprintln!("{}: configuration is invalid", path.display());
            ExitCode::from(1)
        }
        Ok(cfg) => {
            if let Some(t) = &cfg.tls {
                if portcullis::server::tls::will_generate(t) {
                    println!(
                        "note: TLS pair {} / {} will be generated at start (self_signed, local use only)",
                        t.cert.display(),
                        t.key.display()
                    );
                } else if let Err(e) = portcullis::server::tls::load_certified_key(t) {
                    eprintln!("{}: [tls]: {e}", path.display());
                    return ExitCode::from(1);
                }
            }
            for n in &cfg.notes {
                println!("note: {n}");
            }
            for w in &cfg.warnings {
                println!("warning: {}:{}:{}: {}", path.display(), w.line, w.column, w.message);
            }
            print_summary(&cfg);
            println!("{}: configuration is valid", path.display());
            match tests {
                Some(t) if !run_policy_tests(cfg, t) => ExitCode::from(1),
                _ => ExitCode::SUCCESS,
            }
        }
    }
}

/// A listener's address, or "-" when it is not configured.
fn show_addr(a: Option<std::net::SocketAddr>) -> String {
    a.map_or_else(|| "-".to_string(), |a| a.to_string())
}

fn print_summary(cfg: &Config) {
    let l = &cfg.listen;
    println!("listeners: https {}  http {}  admin {}", show_addr(l.https), show_addr(l.http), show_addr(l.admin));
    println!("upstreams:");
    for (name, u) in &cfg.upstreams {
        let (connect, timeout) = (format_duration(u.connect_timeout), format_duration(u.timeout));
        let targets: Vec<String> = u
            .targets
            .iter()
            .map(|t| {
                if t.weight == 1 {
                    format!("{}://{}", u.scheme, t.authority)
                } else {
                    format!("{}://{} (weight {})", u.scheme, t.authority, t.weight)
                }
            })
            .collect();
        let pool = if targets.len() > 1 { format!("  {} over {} targets", u.balance, targets.len()) } else { String::new() };
        println!("  {name:<16} {}{pool}  {}  connect {connect}, timeout {timeout}", targets.join(", "), u.protocol.as_str());
    }
    println!("issuers:");
    for i in &cfg.issuers {
        let algorithms = i.algorithms.iter().map(|a| portcullis::auth::keys::alg_name(*a)).collect::<Vec<_>>().join(",");
        println!("  {:<16} {}  {algorithms}", i.id, i.issuer);
    }
    println!("routes (first match wins):");
    for r in cfg.routes.routes() {
        let methods = r.methods.as_ref().map_or("*".to_string(), |m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","));
        println!("  {:<16} {:<8} {:<24} -> {:<10} auth={}", r.name, methods, r.pattern.to_string(), r.upstream, r.policy.auth.as_str());
    }
}

/// The demo's config: the one named, or the built-in copy when the default name is not in this folder.
fn demo_config(config: PathBuf) -> std::io::Result<PathBuf> {
    if config.exists() || config != Path::new(DEFAULT_CONFIG) {
        return Ok(config);
    }
    let builtin = portcullis::tools::demo::write_builtin_config()?;
    eprintln!("no {DEFAULT_CONFIG} here: running the built-in demo config, written to {}", builtin.display());
    Ok(builtin)
}

fn healthcheck(url: &str, timeout: &str) -> ExitCode {
    let timeout = match parse_duration(timeout) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("--timeout: {e}");
            return ExitCode::from(2);
        }
    };
    match portcullis::tools::healthcheck::probe(url, timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::from(1)
        }
    }
}

fn with_config(path: &Path, workers: Option<usize>, f: impl FnOnce(Config, Option<usize>) -> ExitCode) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                tracing::warn!("{}:{}:{}: {}", path.display(), w.line, w.column, w.message);
            }
            f(cfg, workers)
        }
        Err(e) => {
            print_config_error(&e);
            ExitCode::from(1)
        }
    }
}

/// Builds the runtime: one worker runs on a current-thread scheduler (no work-stealing bookkeeping to pay for);
/// more use the multi-thread scheduler.
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let n = workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    if n == 1 {
        return tokio::runtime::Builder::new_current_thread().enable_all().build();
    }
    tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()
}

fn run(cfg: Config, workers: Option<usize>, demo: bool) -> ExitCode {
    let workers = workers.or(cfg.worker_threads);
    let rt = match runtime(workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        if demo {
            let addr = cfg
                .upstreams
                .get("api")
                .or_else(|| cfg.upstreams.values().next())
                .and_then(|u| u.authority()?.as_str().parse::<std::net::SocketAddr>().ok());
            match addr {
                Some(a) => {
                    if let Err(e) = portcullis::tools::demo::spawn_echo_upstream(a).await {
                        eprintln!("demo: cannot start the echo upstream on {a}: {e}");
                        return ExitCode::from(1);
                    }
                }
                None => {
                    eprintln!("demo: the config has no upstream with an IP:PORT address for the echo server");
                    return ExitCode::from(1);
                }
            }
        }
        let token_path = cfg.token_endpoint.as_ref().map(|t| t.path.clone());
        let gw = match portcullis::start(cfg).await {
            Ok(gw) => gw,
            Err(e) => {
                eprintln!("cannot start: {e}");
                return ExitCode::from(1);
            }
        };
        tracing::info!(https = %show_addr(gw.https), http = %show_addr(gw.http), admin = %show_addr(gw.admin), "portcullis started");
        if demo {
            portcullis::tools::demo::print_guide(gw.https.or(gw.http), gw.admin, token_path.as_deref());
        }
        wait_for_signal(&gw).await;
        tracing::info!("shutting down: draining connections");
        gw.stop().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Waits for SIGTERM or SIGINT; SIGHUP reloads the config meanwhile.
async fn wait_for_signal(gw: &portcullis::RunningGateway) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = gw.reload().await;
            }
        }
    }
}

fn token(path: &Path, issuer: &str, sub: &str, roles: &str, scopes: &str, ttl: &str) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            print_config_error(&e);
            return ExitCode::from(1);
        }
    };
    let Some(iss) = cfg.issuers.iter().find(|i| i.id == issuer) else {
        eprintln!("no issuer {issuer:?} in {}", path.display());
        return ExitCode::from(1);
    };
    let ttl = match parse_duration(ttl) {
        Ok(d) => d.as_secs(),
        Err(e) => {
            eprintln!("--ttl: {e}");
            return ExitCode::from(1);
        }
    };
    let roles: Vec<String> = roles.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect();
    let scopes: Vec<String> = scopes.split_whitespace().map(str::to_string).collect();
    match portcullis::token_endpoint::mint(iss, sub, &roles, &scopes, ttl) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn revoke(
    path: &Path,
    jti: Option<String>,
    sub: Option<String>,
    before: Option<String>,
    issuer: Option<String>,
    until: Option<String>,
    admin: Option<std::net::SocketAddr>,
) -> ExitCode {
    use portcullis::store::Revocation;
    use portcullis::tools::revoke;
    let mut cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            print_config_error(&e);
            return ExitCode::from(1);
        }
    };
    if admin.is_some() {
        cfg.listen.admin = admin;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let what = match (jti, sub, before) {
        (Some(jti), _, _) => Ok(Revocation::Jti { jti }),
        (None, Some(sub), Some(before)) => {
            revoke::parse_time(&before, now, false).map(|before| Revocation::Subject { issuer, sub, before })
        }
        _ => Err(revoke::RevokeError::Time("give --jti, or --sub with --before".into())),
    };
    let entry = what.and_then(|w| revoke::entry(&cfg, w, until.as_deref(), now));
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return ExitCode::from(1) };
    match entry.map(|e| (rt.block_on(revoke::revoke(&cfg, e.clone())), e)) {
        Ok((Ok(place), e)) => {
            println!("revoked {:?} until {} in {place}", e.what, e.until);
            ExitCode::SUCCESS
        }
        Ok((Err(err), _)) | Err(err) => {
            eprintln!("revoke: {err}");
            ExitCode::from(1)
        }
    }
}

fn hash_password() -> ExitCode {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("Password: ")
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line.trim_end_matches(['\r', '\n']).to_string())
    };
    let password = match password {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => {
            eprintln!("empty password");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("cannot read the password: {e}");
            return ExitCode::from(1);
        }
    };
    if password.len() > portcullis::token_endpoint::MAX_FORM_BYTES {
        eprintln!("password too long");
        return ExitCode::from(1);
    }
    match portcullis::token_endpoint::accounts::hash_password(password.as_bytes()) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
