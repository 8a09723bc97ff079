//! Log lines reach stderr from a thread of their own, so a request never
//! waits on a write(2) to a slow terminal, pipe or journal: the tokio worker
//! formats the line and queues it. On a quiet server each line is written
//! at once; on a busy one, lines gather for a few milliseconds and go out
//! in one write. The queue is bounded; when it is full, loggers wait (lines are
//! never dropped). Dropping the returned [`Flush`] writes out what is queued.

use std::io::Write;
use std::sync::mpsc;

/// Lines waiting at most before loggers wait for the writer.
const QUEUE: usize = 16 * 1024;
/// After writing a batch of at least `BUSY_BATCH` lines, the writer lets
/// the next ones gather for `GATHER`.
const BUSY_BATCH: usize = 16;
const GATHER: std::time::Duration = std::time::Duration::from_millis(5);

enum Msg {
    Line(Vec<u8>),
    Flush(mpsc::SyncSender<()>),
}

/// The `MakeWriter` for tracing-subscriber: one buffer per event.
#[derive(Clone)]
pub struct LogPipe {
    tx: mpsc::SyncSender<Msg>,
}

/// Writes out every queued line when dropped.
pub struct Flush {
    tx: mpsc::SyncSender<Msg>,
}

impl Drop for Flush {
    fn drop(&mut self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// Starts the writer thread over `out`.
pub fn start(out: impl Write + Send + 'static) -> (LogPipe, Flush) {
    let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
    std::thread::Builder::new()
        .name("keyward-log".into())
        .spawn(move || {
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
            while let Ok(first) = rx.recv() {
                let mut next = Some(first);
                let mut flushed = Vec::new();
                let mut lines = 0;
                while let Some(msg) = next {
                    match msg {
                        Msg::Line(line) => {
                            let _ = out.write_all(&line);
                            lines += 1;
                        }
                        Msg::Flush(done) => flushed.push(done),
                    }
                    next = rx.try_recv().ok();
                }
                let _ = out.flush();
                for done in flushed {
                    let _ = done.send(());
                }
                // A busy server: let the next lines gather, for one wake-up
                // and one write per batch rather than per line. A quiet one
                // gets each line written at once.
                if lines >= BUSY_BATCH {
                    std::thread::sleep(GATHER);
                }
            }
        })
        .expect("spawning the log writer thread");
    (LogPipe { tx: tx.clone() }, Flush { tx })
}

/// One event's bytes, queued whole when tracing drops the writer.
pub struct Line {
    buf: Vec<u8>,
    tx: mpsc::SyncSender<Msg>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.tx.send(Msg::Line(std::mem::take(&mut self.buf)));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogPipe {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { buf: Vec::with_capacity(256), tx: self.tx.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Every line arrives whole and in order once the flush guard is dropped.
    #[test]
    fn lines_arrive_whole_and_in_order_by_the_flush() {
        use tracing_subscriber::fmt::MakeWriter;
        let sink = Sink::default();
        let (pipe, flush) = start(sink.clone());
        for i in 0..1000 {
            let mut w = pipe.make_writer();
            write!(w, "line {i} ").unwrap();
            writeln!(w, "end").unwrap();
        }
        drop(flush);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert!(lines.iter().enumerate().all(|(i, l)| *l == format!("line {i} end")));
    }
}
