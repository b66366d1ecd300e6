//! A log writer that never puts a syscall, a thread wake-up or a lock shared by every request on the request
//! path: each thread appends whole lines to its own buffer (its lock is contended only by the flusher), and a
//! background thread writes all buffers to stderr every 100 ms, or a thread writes its own at once past 256 KiB,
//! which bounds memory. At most the last 100 ms of lines can be lost if the process is killed; lines from
//! different threads may reach stderr slightly out of order (each carries its timestamp).

use std::cell::OnceCell;
use std::io::Write;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

const FLUSH_EVERY: Duration = Duration::from_millis(100);
const FLUSH_AT: usize = 256 * 1024;

type Buffer = Arc<Mutex<Vec<u8>>>;

/// Every live thread's buffer, for the flusher. Touched once per thread, not per line.
static BUFFERS: Mutex<Vec<Weak<Mutex<Vec<u8>>>>> = Mutex::new(Vec::new());

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

fn write_out(buf: &Mutex<Vec<u8>>) {
    let pending = match buf.lock() {
        Ok(mut b) if !b.is_empty() => std::mem::take(&mut *b),
        _ => return,
    };
    let _ = std::io::stderr().lock().write_all(&pending);
}

fn append(data: &[u8]) {
    let appended = LOCAL.try_with(|cell| {
        let local = cell.get_or_init(|| {
            let buf = Buffer::default();
            if let Ok(mut all) = BUFFERS.lock() {
                all.push(Arc::downgrade(&buf));
            }
            ThreadBuffer(buf)
        });
        let full = match local.0.lock() {
            Ok(mut b) => {
                b.extend_from_slice(data);
                b.len() >= FLUSH_AT
            }
            Err(_) => false,
        };
        if full {
            write_out(&local.0);
        }
    });
    // During thread teardown the thread-local is gone: write directly.
    if appended.is_err() {
        let _ = std::io::stderr().lock().write_all(data);
    }
}

/// The `tracing` writer factory; create it once with [`BufferedStderr::start`].
#[derive(Clone, Copy)]
pub struct BufferedStderr(());

impl BufferedStderr {
    /// Starts the flusher thread and returns the writer factory.
    pub fn start() -> BufferedStderr {
        let _ = std::thread::Builder::new().name("portcullis-log".into()).spawn(|| loop {
            std::thread::sleep(FLUSH_EVERY);
            BufferedStderr(()).flush_now();
        });
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

#[cfg(test)]
mod tests {
    use super::*;

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
