//! Any bytes after a valid HELLO, as a client's requests to `dsync serve`:
//! answers or a closed connection, never a panic, and never an allocation
//! of a frame's claimed length before it is checked. The repository is
//! served read-only so that the fuzzer cannot fill the disk.
#![no_main]
use std::sync::OnceLock;

use dsync_store::remote::serve::{serve, ServeOptions};
use dsync_store::remote::wire::{self, hello, op, Enc};
use libfuzzer_sys::fuzz_target;

fn hello_frame() -> &'static [u8] {
    static FRAME: OnceLock<(tempfile::TempDir, Vec<u8>)> = OnceLock::new();
    &FRAME
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let repo = dir.path().join("repo");
            dsync_store::Repo::init(&repo, Default::default()).expect("init");
            let body = Enc::default()
                .rest(wire::MAGIC)
                .u32(wire::VERSION)
                .u8(hello::OPEN)
                .rest(repo.as_os_str().as_encoded_bytes())
                .0;
            let mut f = Vec::new();
            wire::write_frame(&mut f, op::HELLO, 0, &body).expect("frame");
            (dir, f)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let opts = ServeOptions {
        read_only: true,
        ..Default::default()
    };
    let mut input = hello_frame().to_vec();
    input.extend_from_slice(data);
    let _ = serve(&opts, &input[..], std::io::sink());
});
