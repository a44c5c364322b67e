//! Any bytes as a pack file, written to disk and opened as the store opens
//! packs: header, trailer, index, then every frame read and checked. Errors
//! are fine; a panic or a frame of the wrong length is not.
#![no_main]
use dsync_store::id::PackId;
use dsync_store::pack::PackReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("dsync-fuzz-{}.pack", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(p) = PackReader::open(&path, PackId(1)) {
        for i in 0..p.frame_count().min(64) {
            if let Ok(f) = p.read_frame(i as u32) {
                let (s, e) = p.frame_range(i).expect("frame range");
                assert_eq!(f.len() as u64, e - s);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
