//! Any bytes as a snapshot manifest: an error or a manifest, never a panic;
//! a manifest that decodes re-encodes to one that decodes the same.
#![no_main]
use dsync_store::format::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Behind a valid envelope too, so the body decoder is what is fuzzed
    // (random bytes rarely pass a BLAKE2b checksum).
    for bytes in [
        data.to_vec(),
        dsync_store::format::seal(dsync_store::format::snapshot::MAGIC, data, false),
    ] {
        let data = &bytes[..];
        if let Ok(s) = Snapshot::decode(data, "fuzz") {
            let again = Snapshot::decode(&s.encode(), "fuzz").expect("re-encoded manifest decodes");
            assert_eq!(again, s);
        }
    }
});
