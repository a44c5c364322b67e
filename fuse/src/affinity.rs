//! Serving threads follow the CPU of the process that reads.
//!
//! A read request wakes a serving thread, and its reply wakes the reader: two
//! wakeups per request, and on a virtual machine a wakeup on another CPU
//! costs far more than on the same one. Measured on the 2-core machine with
//! one reader doing random 4 KiB reads: daemon and reader pinned to one CPU,
//! 21,800-22,300 reads/s; pinned to different CPUs, 10,500-12,000; left to
//! the scheduler, 16,300-21,300, which usually keeps them apart. So every
//! 64th read a serving thread looks up the CPU its requester last ran on
//! (/proc/PID/stat) and moves there: 19,000-27,500 reads/s in alternating
//! runs (median 21,000 vs 19,500), 4 readers unchanged. Several readers on
//! several CPUs spread the serving threads among them.
//!
//! Only small reads: a sequential reader's readahead requests (large) are
//! better decompressed on every CPU while the reader copies on its own;
//! bound to the reader's CPU, `cat` lost 8-10 % (1,455-1,814 vs 1,600-2,021
//! MB/s alternating). A large request unbinds its thread.

use std::cell::Cell;

/// Requests between two looks at the requester's CPU.
const EVERY: u32 = 64;

thread_local! {
    static COUNT: Cell<u32> = const { Cell::new(0) };
    /// The CPU this thread is bound to, if any.
    static BOUND: Cell<Option<usize>> = const { Cell::new(None) };
    /// The CPUs it may use when not bound (its mask before binding).
    static FREE: Cell<Option<libc::cpu_set_t>> = const { Cell::new(None) };
}

/// Called by a serving thread for each read request of `pid`; `small`: a
/// random read rather than the kernel's readahead.
pub fn follow(pid: u32, small: bool) {
    if !small {
        if BOUND.with(Cell::get).is_some() {
            if let Some(set) = FREE.with(Cell::get) {
                // SAFETY: a set sched_getaffinity filled in; this thread only.
                unsafe {
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
            }
            BOUND.with(|b| b.set(None));
        }
        return;
    }
    let n = COUNT.with(|c| {
        let v = c.get().wrapping_add(1);
        c.set(v);
        v
    });
    if n % EVERY != 1 || pid == 0 {
        return;
    }
    let Some(cpu) = last_cpu(pid) else { return };
    if BOUND.with(Cell::get) == Some(cpu) || cpu >= libc::CPU_SETSIZE as usize {
        return;
    }
    if FREE.with(Cell::get).is_none() {
        // SAFETY: a zeroed cpu_set_t is valid; the call fills it in.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let got =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if got != 0 {
            return;
        }
        FREE.with(|f| f.set(Some(set)));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within
    // it (checked above); sched_setaffinity(0, ...) binds this thread only.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    if ok {
        BOUND.with(|b| b.set(Some(cpu)));
    }
}

/// The CPU task `pid` last ran on: field 39 of /proc/PID/stat. `None` when
/// the task is gone or in another pid namespace.
fn last_cpu(pid: u32) -> Option<usize> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu(&stat)
}

/// Field 39 of a /proc/PID/stat line (the command name, field 2, is in
/// parentheses and may hold spaces and parentheses itself).
fn parse_cpu(stat: &str) -> Option<usize> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow the name; 39 is the 37th of them.
    after.split_whitespace().nth(36)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_of_a_stat_line() {
        let line = "4242 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 \
                    22 23 24 25 26 27 28 29 30 31 32 33 34 35 1 0 0";
        assert_eq!(super::parse_cpu(line), Some(1));
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(super::parse_cpu(&own).is_some(), "{own}");
        assert_eq!(super::parse_cpu("garbage"), None);
    }
}
