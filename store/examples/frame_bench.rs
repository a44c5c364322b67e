//! Time to read (pread + XXH3 + zstd) every frame of a pack, in a random
//! order, as the mount does on a miss: `frame_bench REPO PACK_ID`.
use dsync_store::backend::LocalBackend;
use dsync_store::id::PackId;
use dsync_store::pack::PackReader;
use std::time::Instant;

fn main() {
    let usage = "usage: frame_bench REPO PACK_ID";
    let repo = std::env::args().nth(1).expect(usage);
    let id = std::env::args()
        .nth(2)
        .and_then(|s| PackId::parse(&s))
        .expect(usage);
    let backend = LocalBackend::open(std::path::Path::new(&repo)).expect("open");
    let p = PackReader::open(&backend, id).expect("open");
    let n = p.frame_count() as u32;
    let mut order: Vec<u32> = (0..n).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut buf = Vec::new();
    let mut bytes = 0;
    let t = Instant::now();
    for &i in &order {
        p.read_frame_into(i, &mut buf).expect("frame");
        bytes += buf.len();
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{n} frames, {:.2} us/frame, {:.0} MB/s",
        s * 1e6 / n as f64,
        bytes as f64 / s / 1e6
    );
}
