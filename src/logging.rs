//! A log writer that never puts a syscall, a thread wake-up or a lock shared by every request on the request
//! path: each thread appends whole lines to its own buffer (its lock is contended only by the flusher), and a
//! background thread writes all buffers to stderr every 100 ms, or at once when a thread's buffer passes 64 KiB.
//! Past 256 KiB (the flusher has fallen behind) a thread writes its own buffer, unless the flusher is writing it
//! at that moment: a request never waits for another thread's `write()` on a slow disk. Only past 16 MiB does it
//! wait, so memory stays bounded.
//! At most the last 100 ms of lines can be lost if the process is killed; lines from different threads may reach
//! stderr slightly out of order (each carries its timestamp).

use std::cell::OnceCell;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

const FLUSH_EVERY: Duration = Duration::from_millis(100);
const FLUSH_AT: usize = 64 * 1024;
/// Past this a thread writes its buffer itself when the flusher is not writing it.
const WRITE_AT: usize = 4 * FLUSH_AT;
/// Past this a thread waits for the flusher's write to end, then writes its own.
const WAIT_AT: usize = 256 * FLUSH_AT;

/// The flusher thread, woken early when a thread's buffer is full.
static FLUSHER: OnceLock<std::thread::Thread> = OnceLock::new();

/// A thread's lines. `active` is appended to; writing out swaps in `spare` (emptied after the previous write), so
/// neither buffer is reallocated and the memory lines are appended to stays warm in cache. `spare` is held for the
/// whole write, which keeps one thread's lines in order when the thread and the flusher write out at once.
#[derive(Default)]
struct Lines {
    active: Mutex<Vec<u8>>,
    spare: Mutex<Vec<u8>>,
}

type Buffer = Arc<Lines>;

/// Every live thread's buffer, for the flusher. Touched once per thread, not per line.
static BUFFERS: Mutex<Vec<Weak<Lines>>> = Mutex::new(Vec::new());

thread_local! {
    static LOCAL: OnceCell<ThreadBuffer> = const { OnceCell::new() };
}

/// A thread's buffer; what is left in it is written out when the thread exits.
struct ThreadBuffer(Buffer);

impl Drop for ThreadBuffer {
    fn drop(&mut self) {
        write_out(&self.0);
    }
}

fn write_out(lines: &Lines) {
    let Ok(out) = lines.spare.lock() else { return };
    write_with(lines, out);
}

/// Writes `lines` out through `out`, its spare buffer, already locked.
fn write_with(lines: &Lines, mut out: std::sync::MutexGuard<'_, Vec<u8>>) {
    match lines.active.lock() {
        Ok(mut active) if !active.is_empty() => std::mem::swap(&mut *active, &mut *out),
        _ => return,
    }
    let _ = std::io::stderr().lock().write_all(&out);
    out.clear();
    // One huge line must not keep a huge buffer.
    out.shrink_to(FLUSH_AT * 2);
}

/// Runs `f` on the calling thread's buffer (returns false during thread teardown, when it is gone).
fn with_buffer(f: impl FnOnce(&mut Vec<u8>)) -> bool {
    LOCAL
        .try_with(|cell| {
            let local = cell.get_or_init(|| {
                let buf = Buffer::default();
                if let Ok(mut all) = BUFFERS.lock() {
                    all.push(Arc::downgrade(&buf));
                }
                ThreadBuffer(buf)
            });
            let len = match local.0.active.lock() {
                Ok(mut b) => {
                    f(&mut b);
                    b.len()
                }
                Err(_) => 0,
            };
            if len >= FLUSH_AT {
                match FLUSHER.get() {
                    // A wake-up (a syscall only if the flusher sleeps), not a write on the request path.
                    Some(flusher) if len < WRITE_AT => flusher.unpark(),
                    _ if len >= WAIT_AT => write_out(&local.0),
                    // The spare is held only while the flusher writes this thread's lines; it is back soon.
                    _ => {
                        if let Ok(out) = local.0.spare.try_lock() {
                            write_with(&local.0, out);
                        }
                    }
                }
            }
        })
        .is_ok()
}

fn append(data: &[u8]) {
    if !with_buffer(|b| b.extend_from_slice(data)) {
        let _ = std::io::stderr().lock().write_all(data);
    }
}

/// The `tracing` writer factory; create it once with [`BufferedStderr::start`].
#[derive(Clone, Copy)]
pub struct BufferedStderr(());

impl BufferedStderr {
    /// Starts the flusher thread and returns the writer factory.
    pub fn start() -> BufferedStderr {
        let flusher = std::thread::Builder::new().name("portcullis-log".into()).spawn(|| loop {
            std::thread::park_timeout(FLUSH_EVERY);
            BufferedStderr(()).flush_now();
        });
        if let Ok(handle) = flusher {
            let _ = FLUSHER.set(handle.thread().clone());
        }
        BufferedStderr(())
    }

    /// Writes out everything buffered so far, dropping the entries of threads that have exited.
    pub fn flush_now(&self) {
        let live: Vec<Buffer> = match BUFFERS.lock() {
            Ok(mut all) => {
                all.retain(|w| w.strong_count() > 0);
                all.iter().filter_map(Weak::upgrade).collect()
            }
            Err(_) => return,
        };
        for buf in live {
            write_out(&buf);
        }
    }
}

/// One log event's writer: appends to the calling thread's buffer.
pub struct LineWriter;

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        append(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BufferedStderr {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The access log line, written straight into the thread's buffer: tracing-subscriber's generic formatter cost
// about 6 % of a proxied request; this writes the same line (text or JSON) without it.

use std::cell::Cell;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};

/// 0: access lines go through `tracing` (no buffered writer installed, e.g. the library embedded elsewhere);
/// 1: written directly as text; 2: directly as JSON; 3: not written (the level filter leaves them out).
static DIRECT: AtomicU8 = AtomicU8::new(0);

/// Called once by the CLI after installing the [`BufferedStderr`] subscriber: access lines bypass `tracing`'s
/// formatter from then on. Its level filter is asked here, once (it is fixed at start).
pub fn direct_access_lines(json: bool) {
    let mode = match (tracing::enabled!(target: "portcullis::access", tracing::Level::INFO), json) {
        (false, _) => 3,
        (true, true) => 2,
        (true, false) => 1,
    };
    DIRECT.store(mode, Ordering::Relaxed);
}

/// One request, as the access log records it.
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub client: IpAddr,
    /// `client` already rendered (the connection's peer), when it is that.
    pub client_text: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub bytes: Option<u64>,
    pub subject: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub rate_limited: bool,
    pub duration_us: u64,
    pub upstream_us: Option<u64>,
    /// Why the gateway refused the request (a fixed name, never client input).
    pub reason: Option<&'static str>,
    /// The Host (or HTTP/2 `:authority`) and User-Agent as sent, cut to [`MAX_LOGGED_FIELD`] bytes.
    pub host: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
    pub http_version: &'static str,
    /// The upstream the request went to and the status it answered.
    pub upstream: Option<&'a str>,
    /// The target of the upstream the last attempt went to.
    pub target: Option<&'a str>,
    pub upstream_status: Option<u16>,
    /// The trace the request belongs to, 32 hex digits.
    pub trace_id: Option<[u8; 32]>,
    /// When the line's event happened (the line's timestamp).
    pub at: std::time::Instant,
}

thread_local! {
    /// The second the cached civil time is for, and that time.
    static CLOCK: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
    /// A monotonic reading and the wall-clock time at it, taken together at most a second ago: the wall time of
    /// a later reading is derived from it instead of read (a clock step shows within a second).
    static WALL: Cell<Option<(std::time::Instant, Duration)>> = const { Cell::new(None) };
}

/// The wall-clock time (since the Unix epoch) at the monotonic instant `at`.
fn wall_time(at: std::time::Instant) -> Duration {
    let read = || {
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (std::time::Instant::now(), wall)
    };
    let derived = WALL.try_with(|w| {
        let (base, wall) = match w.get() {
            Some((base, wall)) if at >= base && at - base < Duration::from_secs(1) => (base, wall),
            _ => {
                let fresh = read();
                w.set(Some(fresh));
                fresh
            }
        };
        wall + at.saturating_duration_since(base)
    });
    derived.unwrap_or_else(|_| read().1)
}

/// A field's key as written before its value: ` key=` (text) or `,"key":` (JSON), one copy each.
#[derive(Clone, Copy)]
struct Key {
    text: &'static str,
    json: &'static str,
}

macro_rules! key {
    ($name:literal) => {
        Key { text: concat!(" ", $name, "="), json: concat!(",\"", $name, "\":") }
    };
}

/// Writes one access-log line.
pub fn access(r: &AccessRecord<'_>) {
    let mode = DIRECT.load(Ordering::Relaxed);
    if mode == 0 {
        tracing::info!(
            target: "portcullis::access",
            request_id = r.request_id, client = %r.client, method = r.method, path = r.path, route = r.route,
            status = r.status, bytes = r.bytes, subject = r.subject, issuer = r.issuer,
            rate_limited = r.rate_limited, duration_us = r.duration_us, upstream_us = r.upstream_us,
            reason = r.reason, host = r.host.map(|h| String::from_utf8_lossy(bounded(h))).as_deref(),
            user_agent = r.user_agent.map(|u| String::from_utf8_lossy(bounded(u))).as_deref(), http_version = r.http_version,
            upstream = r.upstream, upstream_target = r.target, upstream_status = r.upstream_status,
            trace_id = r.trace_id.as_ref().map(|t| String::from_utf8_lossy(t)).as_deref(),
        );
        return;
    }
    if mode == 3 {
        return;
    }
    let now = wall_time(r.at);
    let civil = CLOCK.try_with(|c| {
        let (secs, civil) = c.get();
        if secs == now.as_secs() {
            return civil;
        }
        let civil = civil_time(now.as_secs());
        c.set((now.as_secs(), civil));
        civil
    });
    let civil = civil.unwrap_or_else(|_| civil_time(now.as_secs()));
    // Formatted straight into the thread's buffer: no second copy of the line.
    with_buffer(|line| {
        let json = mode == 2;
        if json {
            line.extend_from_slice(b"{\"timestamp\":\"");
        }
        line.extend_from_slice(&civil[..]);
        line.push(b'.');
        let micros = now.subsec_micros();
        let mut m = itoa::Buffer::new();
        let digits = m.format(micros);
        line.extend(std::iter::repeat_n(b'0', 6 - digits.len()));
        line.extend_from_slice(digits.as_bytes());
        if json {
            line.extend_from_slice(b"Z\",\"level\":\"INFO\"");
        } else {
            line.extend_from_slice(b"Z  INFO portcullis::access:");
        }
        let mut f = Fields { line, json };
        f.str(key!("request_id"), r.request_id);
        let mut ip = [0u8; 48];
        let ip = match r.client_text {
            Some(text) => text.as_bytes(),
            None => {
                use std::io::Write as _;
                let mut w = &mut ip[..];
                let _ = write!(w, "{}", r.client);
                let left = w.len();
                &ip[..48 - left]
            }
        };
        f.raw_str(key!("client"), ip);
        f.raw_str(key!("method"), r.method.as_bytes());
        f.str(key!("path"), r.path);
        f.str(key!("route"), r.route);
        f.num(key!("status"), u64::from(r.status));
        if let Some(b) = r.bytes {
            f.num(key!("bytes"), b);
        }
        if let Some(s) = r.subject {
            f.str(key!("subject"), s);
        }
        if let Some(s) = r.issuer {
            f.str(key!("issuer"), s);
        }
        if let Some(reason) = r.reason {
            f.raw_str(key!("reason"), reason.as_bytes());
        }
        if let Some(h) = r.host {
            f.bytes(key!("host"), bounded(h));
        }
        f.raw_str(key!("http_version"), r.http_version.as_bytes());
        if let Some(u) = r.user_agent {
            f.bytes(key!("user_agent"), bounded(u));
        }
        f.bool(key!("rate_limited"), r.rate_limited);
        f.num(key!("duration_us"), r.duration_us);
        if let Some(u) = r.upstream {
            f.str(key!("upstream"), u);
        }
        if let Some(t) = r.target {
            f.str(key!("upstream_target"), t);
        }
        if let Some(s) = r.upstream_status {
            f.num(key!("upstream_status"), u64::from(s));
        }
        if let Some(u) = r.upstream_us {
            f.num(key!("upstream_us"), u);
        }
        if let Some(t) = &r.trace_id {
            f.raw_str(key!("trace_id"), t);
        }
        if json {
            f.line.extend_from_slice(b",\"target\":\"portcullis::access\"}");
        }
        f.line.push(b'\n');
    });
}

/// The most of a client-chosen field (Host, User-Agent) a line carries: a long value cannot bloat the log.
pub const MAX_LOGGED_FIELD: usize = 256;

fn bounded(v: &[u8]) -> &[u8] {
    &v[..v.len().min(MAX_LOGGED_FIELD)]
}

/// Bytes a quoted string carries as they are (one table lookup per byte instead of four comparisons).
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x20;
    while b < 256 {
        t[b] = b != 0x7f && b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    t
};

/// Appends `key=value` (text) or `,"key":value` (JSON) fields to a line.
struct Fields<'a> {
    line: &'a mut Vec<u8>,
    json: bool,
}

impl Fields<'_> {
    fn key(&mut self, k: Key) {
        self.line.extend_from_slice(if self.json { k.json } else { k.text }.as_bytes());
    }

    /// A quoted, escaped string (text quotes like `tracing` does for strings).
    fn str(&mut self, k: Key, v: &str) {
        self.key(k);
        self.line.push(b'"');
        if v.as_bytes().iter().all(|&b| PLAIN[usize::from(b)]) {
            // The usual case (ids, paths, names): one copy.
            self.line.extend_from_slice(v.as_bytes());
            self.line.push(b'"');
            return;
        }
        for &b in v.as_bytes() {
            match b {
                b'"' | b'\\' => self.line.extend_from_slice(&[b'\\', b]),
                b if b < 0x20 || b == 0x7f => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    self.line.extend_from_slice(b"\\u00");
                    self.line.push(HEX[usize::from(b >> 4)]);
                    self.line.push(HEX[usize::from(b & 15)]);
                }
                b => self.line.push(b),
            }
        }
        self.line.push(b'"');
    }

    /// Header bytes as a quoted string: what is not UTF-8 (obs-text) is written as U+FFFD, so JSON stays valid.
    fn bytes(&mut self, k: Key, v: &[u8]) {
        match std::str::from_utf8(v) {
            Ok(s) => self.str(k, s),
            Err(_) => self.str(k, &String::from_utf8_lossy(v)),
        }
    }

    /// A value known to need no escaping (an address, a method token): bare in text, quoted in JSON.
    fn raw_str(&mut self, k: Key, v: &[u8]) {
        self.key(k);
        if self.json {
            self.line.push(b'"');
        }
        self.line.extend_from_slice(v);
        if self.json {
            self.line.push(b'"');
        }
    }

    fn num(&mut self, k: Key, v: u64) {
        self.key(k);
        self.line.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    fn bool(&mut self, k: Key, v: bool) {
        self.key(k);
        self.line.extend_from_slice(if v { b"true" } else { b"false" });
    }
}

/// "YYYY-MM-DDTHH:MM:SS" (UTC) for seconds since the epoch (days to civil date: Howard Hinnant's algorithm).
fn civil_time(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year.max(0) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3600);
    put(14, 2, rem % 3600 / 60);
    put(17, 2, rem % 60);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time_matches_known_dates() {
        assert_eq!(&civil_time(0), b"1970-01-01T00:00:00");
        assert_eq!(&civil_time(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&civil_time(1_795_910_399), b"2026-11-28T23:59:59");
    }

    #[test]
    fn wall_time_is_derived_from_the_monotonic_reading() {
        let wall = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let (before, at) = (wall(), std::time::Instant::now());
        let derived = wall_time(at);
        assert!(derived + Duration::from_millis(50) >= before && derived <= wall() + Duration::from_millis(50));
        // A reading 400 ms on is 400 ms on (an offset from the anchor while it is under a second old).
        let next = std::time::Instant::now();
        let (a, b) = (wall_time(next), wall_time(next + Duration::from_millis(400)));
        assert!(b.abs_diff(a + Duration::from_millis(400)) < Duration::from_millis(5), "{a:?} {b:?}");
        // Past a second the anchor is renewed; an instant before the anchor is read afresh, never underflows.
        let far = std::time::Instant::now() + Duration::from_secs(5);
        assert!(wall_time(far) >= wall() + Duration::from_secs(4));
        assert!(wall_time(at) + Duration::from_millis(50) >= before);
    }

    #[test]
    fn fields_escape_strings_and_keep_json_valid() {
        let mut line = Vec::new();
        let mut f = Fields { line: &mut line, json: true };
        f.str(key!("path"), "/a\"b\\c\u{1}");
        f.num(key!("status"), 200);
        f.bool(key!("rate_limited"), false);
        f.raw_str(key!("client"), b"127.0.0.1");
        let text = format!("{{\"x\":1{}}}", String::from_utf8(line).unwrap());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}");
        assert_eq!(v["status"], 200);
        assert_eq!(v["client"], "127.0.0.1");
    }

    #[test]
    fn client_chosen_fields_are_cut_and_stay_valid_json() {
        let mut line = Vec::new();
        let mut f = Fields { line: &mut line, json: true };
        let mut agent = "é".repeat(400).into_bytes();
        agent.push(0xff);
        f.bytes(key!("user_agent"), bounded(&agent));
        f.bytes(key!("host"), b"h\xfe\"st");
        let text = format!("{{\"x\":1{}}}", String::from_utf8(line).unwrap());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let logged = v["user_agent"].as_str().unwrap();
        // 128 two-byte characters fill the 256 bytes; nothing past the bound is written.
        assert_eq!(logged.chars().count(), 128, "{logged}");
        assert_eq!(v["host"], "h\u{fffd}\"st");
    }

    #[test]
    fn a_thread_does_not_wait_for_the_flusher_writing_its_lines() {
        use std::sync::mpsc::channel;
        let (buffer_tx, buffer_rx) = channel();
        let (go_tx, go_rx) = channel::<()>();
        let (done_tx, done_rx) = channel();
        let writer = std::thread::spawn(move || {
            with_buffer(|_| {});
            buffer_tx.send(LOCAL.with(|c| c.get().map(|b| b.0.clone()))).unwrap();
            go_rx.recv().unwrap();
            // Past WRITE_AT but short of WAIT_AT: appended while the spare is held elsewhere.
            let line = [b' '; 1024];
            for _ in 0..(WRITE_AT / 1024 + 64) {
                append(&line);
            }
            done_tx.send(()).unwrap();
            go_rx.recv().unwrap();
        });
        let lines = buffer_rx.recv().unwrap().unwrap();
        let writing = lines.spare.lock().unwrap(); // the flusher, in the middle of a write
        go_tx.send(()).unwrap();
        let waited = done_rx.recv_timeout(Duration::from_secs(10));
        drop(writing);
        // Nothing is written to the test's stderr: the lines are taken back before the thread exits.
        assert!(lines.active.lock().unwrap().len() > WRITE_AT);
        lines.active.lock().unwrap().clear();
        go_tx.send(()).unwrap();
        writer.join().unwrap();
        assert!(waited.is_ok(), "the appending thread blocked on the held buffer");
    }

    #[test]
    fn lines_from_exited_threads_are_not_lost_and_buffers_are_pruned() {
        std::thread::spawn(|| append(b"from a thread that exits\n")).join().unwrap();
        append(b"from the test thread\n");
        let before = BUFFERS.lock().unwrap().len();
        BufferedStderr(()).flush_now();
        let after = BUFFERS.lock().unwrap().len();
        assert!(after <= before);
        assert!(BUFFERS.lock().unwrap().iter().all(|w| w.strong_count() > 0));
    }
}
