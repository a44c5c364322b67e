//! Differential test: on the same inputs, fast_rsync's delta and ours both
//! rebuild the new file exactly, and ours is no larger at 4 KiB blocks.

use dsync_store::delta::{apply, diff, Signature};
use dsync_store::testdata::pseudo;
use proptest::prelude::*;

fn both(old: &[u8], new: &[u8], bs: u32) -> (usize, u64) {
    let theirs_sig = fast_rsync::Signature::calculate(
        old,
        fast_rsync::SignatureOptions {
            block_size: bs,
            crypto_hash_size: 16,
        },
    );
    let mut delta = Vec::new();
    fast_rsync::diff(&theirs_sig.index(), new, &mut delta).unwrap();
    let mut rebuilt = Vec::new();
    fast_rsync::apply(old, &delta, &mut rebuilt).unwrap();
    assert!(rebuilt == new, "fast_rsync's rebuild differs");

    let ours = diff(&Signature::calculate(old, bs).view(), new, 1 << 20);
    let rebuilt = apply(old, &ours.ops, new).unwrap();
    assert!(rebuilt == new, "our rebuild differs");
    (delta.len(), ours.encoded_len())
}

#[test]
fn scattered_writes_and_inserts() {
    let old = pseudo(8 << 20, 1);
    let mut new = old.clone();
    for k in 0..100usize {
        let at = (k * 80_000) & !4095;
        new[at..at + 4096].copy_from_slice(&pseudo(4096, k as u64 + 7));
    }
    new.splice(3_000_001..3_000_001, pseudo(777, 3));
    new.drain(6_000_000..6_000_500);
    let (theirs, ours) = both(&old, &new, 4096);
    let theirs = theirs as u64;
    eprintln!("delta bytes: ours {ours}, fast_rsync {theirs}");
    assert!(ours <= theirs, "ours {ours} vs fast_rsync {theirs}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn same_inputs_both_rebuild(
        old in proptest::collection::vec(any::<u8>(), 0..30_000),
        cut in any::<usize>(),
        ins in proptest::collection::vec(any::<u8>(), 0..3_000),
    ) {
        let mut new = old.clone();
        let at = if new.is_empty() { 0 } else { cut % new.len() };
        new.splice(at..at, ins);
        both(&old, &new, 1024);
    }
}
