//! After a small read missed, the rest of the frame it decompressed goes into
//! the kernel's page cache (FUSE_NOTIFY_STORE), so that later reads of its
//! neighbours are served by the kernel without a request to the daemon.
//!
//! Stores run on their own thread, never on a thread that serves requests:
//! storing locks the pages it fills, and a page may be locked by a read that
//! waits for a serving thread, so a serving thread that stored could wait
//! on itself. Jobs are handed over in batches, because waking another
//! thread costs more here than a store saves when done one by one.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use dsync_store::VersionReader;
use fuser::{INodeNo, Notifier};

/// Jobs handed over at once.
const BATCH: usize = 8;
/// Jobs waiting at most; more are dropped (prefilling is only a help).
const MAX_QUEUE: usize = 256;

struct Job {
    ino: u64,
    reader: Arc<VersionReader>,
    off: u64,
    len: u64,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// The thread waits for a first job (not for a batch to fill).
    idle: bool,
}

#[derive(Default)]
pub struct Prefill {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Prefill {
    /// Asks for the frame around `[off, off + len)` of `ino` to be stored.
    pub fn push(&self, ino: u64, reader: Arc<VersionReader>, off: u64, len: u64) {
        let Ok(mut q) = self.queue.lock() else { return };
        if q.jobs.len() >= MAX_QUEUE {
            return;
        }
        q.jobs.push(Job {
            ino,
            reader,
            off,
            len,
        });
        if q.idle || q.jobs.len() == BATCH {
            q.idle = false;
            self.ready.notify_one();
        }
    }

    /// Starts the storing thread (after the signal mask is set: it inherits
    /// SIGINT/SIGTERM blocked).
    pub fn start(self: &Arc<Self>, notifier: Notifier) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("dsync-prefill".into())
            .spawn(move || me.run(&notifier))
            .map(|_| ())
    }

    fn run(&self, notifier: &Notifier) {
        // Readers waiting on requests come first; not SCHED_IDLE, which a
        // busy machine could starve while it holds the pages it fills.
        // SAFETY: setpriority on this thread (Linux: a tid is a process id).
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
        }
        let mut buf = Vec::new();
        loop {
            let jobs = {
                let Ok(mut q) = self.queue.lock() else { return };
                loop {
                    if q.jobs.is_empty() {
                        // Nothing to do: sleep until a first job comes.
                        q.idle = true;
                        let Ok(g) = self.ready.wait(q) else { return };
                        q = g;
                        continue;
                    }
                    if q.jobs.len() >= BATCH {
                        break;
                    }
                    // A partial batch: a little time for more to come.
                    let wait = Duration::from_millis(20);
                    let Ok((g, t)) = self.ready.wait_timeout(q, wait) else {
                        return;
                    };
                    q = g;
                    if t.timed_out() {
                        break;
                    }
                }
                std::mem::take(&mut q.jobs)
            };
            for j in jobs {
                store(notifier, &j, &mut buf);
            }
        }
    }
}

/// Stores the whole pages of the frame span around the job's read.
fn store(notifier: &Notifier, j: &Job, buf: &mut Vec<u8>) {
    let Ok(Some((a, b))) = j.reader.frame_span(j.off) else {
        return;
    };
    let size = j.reader.size();
    let a = a.div_ceil(4096) * 4096;
    let b = if b >= size { size } else { b / 4096 * 4096 };
    if b <= a || b - a <= j.len {
        return;
    }
    buf.resize((b - a) as usize, 0);
    match j.reader.read_at(a, buf) {
        Ok(n) if n > 0 => {
            // The kernel may have dropped the inode meanwhile: no matter.
            let _ = notifier.store(INodeNo(j.ino), a, &buf[..n]);
        }
        _ => {}
    }
}
