//! A backup to a remote repository that is cut off and run again does not
//! send again what already crossed.
//!
//! Such a backup writes its data packs as it goes. When the link drops, the
//! packs it finished are on the server, but no snapshot names them (they are
//! garbage until a prune removes them). The client keeps, in its cache of the
//! repository, a journal of what each finished and synced pack holds: for
//! every chunk of frames (the compressed literals of up to one chunk of a
//! file), a hash of the frames and where they start in the pack. The next
//! backup, of any source, loads every journal of the repository, keeps the
//! entries whose packs the server still lists at their recorded length, and
//! stores a chunk whose frames hash the same by reference to the frames
//! already there instead of sending them. Frames that are equal byte for byte
//! decompress to the same bytes, so the reference is exact; a chunk that
//! differs (the source changed between the tries) is sent as usual. A backup
//! that commits removes the journals it loaded and its own.
//!
//! A journal is `resume-<16 hex digits>.log` in the cache directory, lines
//! of text, each ending with the XXH3-64 (16 hex digits) of what precedes
//! it on the line:
//!
//! ```text
//! pack <pack id> <object length> <check>
//! frames <XXH3-128 of the frames, 32 hex digits> <uncompressed length> <start> <check>
//! ```
//!
//! A `frames` line belongs to the `pack` line before it; `start` is where
//! the frames begin in the pack's uncompressed stream. A pack's lines are
//! written together after the pack is finished and synced (durable on the
//! server). Reading stops at the first line that does not parse or check (a
//! journal cut short by a crash).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::backend::{Backend, Kind};
use crate::id::PackId;
use crate::pack::FrameMeta;

/// What identifies a chunk's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FramesKey {
    hash: u128,
    ulen: u64,
}

impl FramesKey {
    /// The key of `frames`, compressed into `compressed`.
    pub(crate) fn of(compressed: &[u8], frames: &[FrameMeta]) -> FramesKey {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut ulen = 0u64;
        for f in frames {
            h.update(&f.clen.to_le_bytes());
            h.update(&f.ulen.to_le_bytes());
            h.update(&compressed[f.start..f.start + f.clen as usize]);
            ulen += u64::from(f.ulen);
        }
        FramesKey {
            hash: h.digest128(),
            ulen,
        }
    }
}

/// The journals of one repository: what earlier tries left, and this one's.
pub(crate) struct Resume {
    dir: PathBuf,
    /// Frames earlier tries left in packs the server still has.
    known: HashMap<FramesKey, (PackId, u64)>,
    /// Journals read (removed once this backup commits).
    loaded: Vec<PathBuf>,
    /// This backup's journal, made at its first finished pack.
    own: Option<(PathBuf, File)>,
    /// Frames appended to the pack being written, and where they start.
    current: Vec<(FramesKey, u64)>,
    /// Compressed bytes not sent again, for the report.
    pub(crate) reused: u64,
}

/// A pack a journal names: its id, its length, and its chunks of frames
/// with where each starts.
type JournalPack = (PackId, u64, Vec<(FramesKey, u64)>);

fn check(fields: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(fields.as_bytes()))
}

fn line(fields: String) -> String {
    let c = check(&fields);
    format!("{fields} {c}\n")
}

impl Resume {
    /// Loads the journals under `dir` and keeps what `backend` still holds.
    /// Unreadable journals and a failed listing only cost the reuse.
    pub(crate) fn load(dir: &Path, backend: &dyn Backend) -> Resume {
        let mut r = Resume {
            dir: dir.to_path_buf(),
            known: HashMap::new(),
            loaded: Vec::new(),
            own: None,
            current: Vec::new(),
            reused: 0,
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return r;
        };
        let mut packs: Vec<JournalPack> = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with("resume-") && name.ends_with(".log")) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            packs.extend(parse(&text));
            r.loaded.push(e.path());
        }
        if packs.is_empty() {
            return r;
        }
        let Ok(listed) = backend.list(Kind::Pack) else {
            return r;
        };
        let listed: HashMap<String, u64> = listed.into_iter().collect();
        for (id, len, frames) in packs {
            if listed.get(&id.to_string()) == Some(&len) {
                for (k, start) in frames {
                    r.known.insert(k, (id, start));
                }
            }
        }
        r
    }

    /// Where frames equal to `key`'s already are, if an earlier try left them.
    pub(crate) fn find(&self, key: &FramesKey) -> Option<(PackId, u64)> {
        self.known.get(key).copied()
    }

    /// Notes frames appended to the pack being written at `start`.
    pub(crate) fn appended(&mut self, key: FramesKey, start: u64) {
        self.current.push((key, start));
    }

    /// Records the pack just finished and synced (`len` bytes long). A
    /// journal that cannot be written only costs the reuse.
    pub(crate) fn pack_done(&mut self, id: PackId, len: u64) {
        let frames = std::mem::take(&mut self.current);
        if frames.is_empty() {
            return;
        }
        let mut text = line(format!("pack {id} {len}"));
        for (k, start) in &frames {
            text.push_str(&line(format!("frames {:032x} {} {start}", k.hash, k.ulen)));
        }
        if self.own.is_none() {
            let path = self
                .dir
                .join(format!("resume-{:016x}.log", crate::id::random_u64()));
            if let Ok(f) = File::create(&path) {
                self.own = Some((path, f));
            }
        }
        if let Some((_, f)) = &mut self.own {
            if f.write_all(text.as_bytes()).is_err() {
                self.own = None;
            }
        }
    }

    /// The backup committed: what the journals name is referenced or not
    /// needed any more.
    pub(crate) fn committed(mut self) {
        if let Some((path, _)) = self.own.take() {
            self.loaded.push(path);
        }
        for p in &self.loaded {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The packs a journal names, up to its first damaged line.
fn parse(text: &str) -> Vec<JournalPack> {
    let mut out: Vec<JournalPack> = Vec::new();
    for l in text.lines() {
        let Some((fields, sum)) = l.rsplit_once(' ') else {
            break;
        };
        if check(fields) != sum {
            break;
        }
        let f: Vec<&str> = fields.split(' ').collect();
        match f.as_slice() {
            ["pack", id, len] => {
                let (Some(id), Ok(len)) = (PackId::parse(id), len.parse()) else {
                    break;
                };
                out.push((id, len, Vec::new()));
            }
            ["frames", hash, ulen, start] => {
                let (Ok(hash), Ok(ulen), Ok(start), Some(last)) = (
                    u128::from_str_radix(hash, 16),
                    ulen.parse(),
                    start.parse(),
                    out.last_mut(),
                ) else {
                    break;
                };
                last.2.push((FramesKey { hash, ulen }, start));
            }
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Key, MemBackend};

    fn key(n: u8) -> FramesKey {
        let data = vec![n; 100];
        FramesKey::of(
            &data,
            &[FrameMeta {
                start: 0,
                clen: 100,
                ulen: 300,
                sum: 0,
            }],
        )
    }

    /// What a finished pack recorded is found by the next try while the
    /// pack is there at its length, and not otherwise.
    #[test]
    fn a_later_try_finds_frames_of_packs_still_there() {
        let d = tempfile::tempdir().unwrap();
        let b = MemBackend::new();
        let kept = PackId(0x11);
        let gone = PackId(0x22);
        let short = PackId(0x33);
        b.put(&Key::pack(kept), &[0; 50]).unwrap();
        b.put(&Key::pack(short), &[0; 40]).unwrap();
        let mut r = Resume::load(d.path(), &b);
        assert!(r.find(&key(1)).is_none());
        for (id, k) in [(kept, 1), (gone, 2), (short, 3)] {
            r.appended(key(k), 7);
            r.appended(key(k + 10), 900);
            r.pack_done(id, 50);
        }
        drop(r);
        let r = Resume::load(d.path(), &b);
        assert_eq!(r.find(&key(1)), Some((kept, 7)));
        assert_eq!(r.find(&key(11)), Some((kept, 900)));
        assert_eq!(r.find(&key(2)), None, "a pack the server lost");
        assert_eq!(r.find(&key(3)), None, "a pack of another length");
        r.committed();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    /// A journal cut anywhere, or with a changed byte, gives only the
    /// whole lines before the damage.
    #[test]
    fn a_damaged_journal_is_read_up_to_the_damage() {
        let mut text = line(format!("pack {} 50", PackId(0x11)));
        text.push_str(&line(format!("frames {:032x} 300 7", 5u128)));
        text.push_str(&line(format!("frames {:032x} 300 9", 6u128)));
        assert_eq!(parse(&text)[0].2.len(), 2);
        for cut in 0..text.len() {
            let got = parse(&text[..cut]);
            // Lines whole in the cut (their newline may be cut off).
            let mut end = 0;
            let whole = text
                .lines()
                .take_while(|l| {
                    end += l.len();
                    let fits = end <= cut;
                    end += 1;
                    fits
                })
                .count();
            assert_eq!(
                got.first().map_or(0, |p| 1 + p.2.len()),
                whole,
                "cut at {cut}"
            );
        }
        let changed = text.replacen("300 9", "300 8", 1);
        assert_eq!(parse(&changed)[0].2.len(), 1);
    }
}
