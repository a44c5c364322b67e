//! Any bytes as a repository config: an error or a config, never a panic.
#![no_main]
use dsync_store::format::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Behind a valid envelope too, so the body decoder is what is fuzzed
    // (random bytes rarely pass a BLAKE2b checksum).
    for bytes in [
        data.to_vec(),
        dsync_store::format::seal(dsync_store::format::config::MAGIC, data, false),
    ] {
        let data = &bytes[..];
        let _ = Config::decode(data, "fuzz");
    }
});
