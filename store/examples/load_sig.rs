//! Times loading a version's extent map and signature (what a backup does
//! before reading the new file): `load_sig REPO [SNAPSHOT]`.

use std::time::Instant;

use dsync_store::{NodeKind, Repo};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let repo = Repo::open(std::path::Path::new(
        &args.next().ok_or("usage: load_sig REPO [SNAPSHOT]")?,
    ))?;
    let snap = repo.resolve(&args.next().unwrap_or_else(|| "latest".into()))?;
    for node in &snap.nodes {
        let NodeKind::File(f) = &node.kind else {
            continue;
        };
        let t = Instant::now();
        let map = repo.load_map(f.map)?;
        let t_map = t.elapsed();
        let sig = repo.sig_view(&map)?;
        let t_sig = t.elapsed();
        let last = sig.blocks().saturating_sub(1);
        let ok = sig.entry(last).is_some();
        println!(
            "{}: {} bytes, {} blocks, {} extents, {} signature pages: map {:.1} ms, map + signature {:.1} ms (last entry readable: {ok})",
            String::from_utf8_lossy(&node.name),
            f.size,
            sig.blocks(),
            map.extents().len(),
            map.body.pages.len(),
            t_map.as_secs_f64() * 1e3,
            t_sig.as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
