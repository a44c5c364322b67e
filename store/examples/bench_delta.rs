//! dsync's delta engine beside fast_rsync on the same buffers (run through
//! scripts/bench-delta). Prints a table of throughputs and ratios.
//!
//! For each workload: the old signature (both engines), then what an
//! incremental backup needs from the new file: dsync's single pass (diff, the
//! new signature and the whole-file hash together) against fast_rsync's diff
//! plus its signature of the new file. Best of three runs; MB = 10^6 bytes.

use std::time::Instant;

use dsync_store::delta::{diff, Signature};
use dsync_store::testdata::pseudo;

const BS: u32 = 4096;

fn text(n: usize, seed: u64) -> Vec<u8> {
    let words: Vec<&[u8]> = b"the of and to in is was for on that with as by at from it an be this are or which have not had but were"
        .split(|&c| c == b' ')
        .collect();
    let r = pseudo(n / 3 + 16, seed);
    let mut v = Vec::with_capacity(n + 16);
    let mut i = 0;
    while v.len() < n {
        v.extend_from_slice(words[r[i % r.len()] as usize % words.len()]);
        v.push(if r[(i + 1) % r.len()].is_multiple_of(11) {
            b'\n'
        } else {
            b' '
        });
        i += 2;
    }
    v.truncate(n);
    v
}

fn best<T>(f: impl Fn() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut out = None;
    for _ in 0..3 {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.expect("ran"))
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let n = mib << 20;
    let base = pseudo(n, 1);
    let mut edited = base.clone();
    for k in 0..200usize {
        let at = (k * (n / 200) + 8192) & !4095;
        edited[at..at + 4096].copy_from_slice(&pseudo(4096, 1000 + k as u64));
    }
    for k in 0..5usize {
        let at = k * (n / 5) + 12_345;
        edited.splice(at..at, pseudo(1000 + k * 77, 50 + k as u64));
    }
    edited.truncate(n);
    let text_old = text(n, 3);
    let mut text_new = text_old.clone();
    for k in 0..200usize {
        let at = k * (n / 200) + 777;
        text_new[at..at + 4096].copy_from_slice(&text(4096, 2000 + k as u64));
    }
    let mut vm = base.clone();
    for k in 0..200usize {
        let at = (k * (n / 200) + 8192) & !4095;
        vm[at..at + 4096].copy_from_slice(&pseudo(4096, 3000 + k as u64));
    }
    let workloads: Vec<(&str, &[u8], &[u8])> = vec![
        ("VM image: 200 scattered 4 KiB writes", &base, &vm),
        ("200 scattered 4 KiB writes + 5 inserts", &base, &edited),
        ("nothing matches (new random data)", &base, &text_old),
        ("text, 200 unaligned 4 KiB writes", &text_old, &text_new),
    ];

    println!("dsync delta engine vs fast_rsync 0.2 (MD4), {mib} MiB buffers, 4 KiB blocks, best of 3, MB = 10^6 B");
    println!();
    println!(
        "| workload | threads | fast_rsync sig MB/s | dsync sig MB/s | fast_rsync diff+new sig MB/s | dsync single pass MB/s | speed-up | fast_rsync delta B | dsync delta B | delta ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let only = std::env::args().nth(2);
    for (name, old, new) in &workloads {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let opts = fast_rsync::SignatureOptions {
            block_size: BS,
            crypto_hash_size: 16,
        };
        let (t_fs_sig, fs_sig) = best(|| fast_rsync::Signature::calculate(old, opts));
        let (t_fs_pass, fs_delta) = best(|| {
            let mut d = Vec::new();
            fast_rsync::diff(&fs_sig.index(), new, &mut d).expect("fast_rsync diff");
            let s = fast_rsync::Signature::calculate(new, opts);
            (d, s.serialized().len())
        });
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let (t_sig, sig) = pool.install(|| best(|| Signature::calculate(old, BS)));
            let view = sig.view();
            // Build the lookup table once, as a backup does before its pass.
            let _ = view.table();
            let (t_pass, d) = pool.install(|| best(|| diff(&view, new, 4 << 20)));
            let rebuilt = dsync_store::delta::apply(old, &d.ops, new).expect("apply");
            assert!(
                rebuilt == *new,
                "dsync's delta does not rebuild the new buffer"
            );
            let mb = |t: f64, len: usize| len as f64 / t / 1e6;
            println!(
                "| {name} | {threads} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x | {} | {} | {:.3} |",
                mb(t_fs_sig, old.len()),
                mb(t_sig, old.len()),
                mb(t_fs_pass, new.len()),
                mb(t_pass, new.len()),
                t_fs_pass / t_pass,
                fs_delta.0.len(),
                d.encoded_len(),
                d.encoded_len() as f64 / fs_delta.0.len() as f64,
            );
        }
    }
}
