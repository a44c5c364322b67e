//! Any bytes as a pack, opened as the store opens packs (through an
//! in-memory backend): header, trailer, index, then every frame read and
//! checked. Errors are fine; a panic or a frame of the wrong length is not.
#![no_main]
use dsync_store::backend::{Backend, Key, MemBackend};
use dsync_store::id::PackId;
use dsync_store::pack::PackReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mem = MemBackend::new();
    if mem.put(&Key::pack(PackId(1)), data).is_err() {
        return;
    }
    if let Ok(p) = PackReader::open(&mem, PackId(1)) {
        for i in 0..p.frame_count().min(64) {
            if let Ok(f) = p.read_frame(i as u32) {
                let (s, e) = p.frame_range(i).expect("frame range");
                assert_eq!(f.len() as u64, e - s);
            }
        }
    }
});
