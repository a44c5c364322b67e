//! Random reads per second on a file (scripts/bench-mount):
//! `randread FILE READERS READS_PER_READER [SIZE=4096]`. Offsets are random,
//! SIZE-aligned, inside the file's data (found with SEEK_DATA/SEEK_HOLE, so
//! holes are not what is measured); every reader does the same number of reads.

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

fn data_ranges(f: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek on a valid fd.
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h <= d {
            break;
        }
        out.push((d as u64, h as u64));
        pos = h;
    }
    if out.is_empty() {
        out.push((0, size));
    }
    out
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: randread FILE READERS READS_PER_READER [SIZE]");
        std::process::exit(2);
    }
    let readers: usize = a[2].parse().expect("READERS");
    let reads: usize = a[3].parse().expect("READS_PER_READER");
    let bs: u64 = a.get(4).map_or(4096, |s| s.parse().expect("SIZE"));
    let f = std::fs::File::open(&a[1]).expect("open");
    let size = f.metadata().expect("stat").len();
    let ranges: Vec<(u64, u64)> = data_ranges(&f, size)
        .into_iter()
        .filter(|(s, e)| e - s >= bs)
        .collect();
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let t = Instant::now();
    std::thread::scope(|sc| {
        for r in 0..readers {
            let (f, ranges) = (&f, &ranges);
            sc.spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (r as u64 + 1);
                let mut buf = vec![0u8; bs as usize];
                for _ in 0..reads {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let mut k = x % total;
                    let mut off = 0;
                    for &(s, e) in ranges {
                        if k < e - s {
                            off = (s + k) / bs * bs;
                            break;
                        }
                        k -= e - s;
                    }
                    f.read_exact_at(&mut buf, off).expect("read");
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    println!("{:.0}", (readers * reads) as f64 / secs);
}
