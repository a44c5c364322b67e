//! Any bytes as an extent map: an error or a valid map, never a panic.
#![no_main]
use dsync_store::format::map::MapBody;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Behind a valid envelope too, so the body decoder is what is fuzzed
    // (random bytes rarely pass a BLAKE2b checksum).
    for bytes in [
        data.to_vec(),
        dsync_store::format::seal(dsync_store::format::map::MAGIC, data, false),
    ] {
        let data = &bytes[..];
        if let Ok(m) = MapBody::decode(data, "fuzz") {
            assert_eq!(
                MapBody::decode(&m.encode(), "fuzz").expect("re-encoded map decodes"),
                m
            );
        }
    }
});
