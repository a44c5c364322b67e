//! Format 3's snapshot record: a small envelope (version 3) naming the
//! snapshot's root list; the tree itself lives in meta packs.

use super::node::Entry;
use super::List;
use crate::error::{Error, Result};
use crate::format::snapshot::MAGIC;
use crate::format::{open_as, seal_as, Reader, Writer};
use crate::id::SnapshotId;

/// The envelope version of a format 3 snapshot record.
pub const RECORD_VERSION: u32 = 3;
impl SnapshotRecord {
    /// What listing the snapshot shows.
    pub fn info(&self) -> crate::format::snapshot::SnapshotInfo {
        crate::format::snapshot::SnapshotInfo {
            id: self.id,
            time_ns: self.time_ns,
            host: self.host.clone(),
            paths: self.paths.clone(),
            stats: crate::format::snapshot::SnapshotStats {
                bytes_read: self.bytes_read,
                bytes_added: self.bytes_added,
                duration_ns: self.duration_ns,
            },
            files: self.files,
            size: self.bytes,
            format: RECORD_VERSION,
        }
    }
}

/// Snapshot flag: some node carries an error.
pub const SNAPSHOT_INCOMPLETE: u32 = 1;

/// A snapshot (FORMAT.md, "Snapshot records").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub time_ns: i64,
    pub host: String,
    pub paths: Vec<String>,
    pub bytes_read: u64,
    pub bytes_added: u64,
    pub duration_ns: u64,
    pub files: u64,
    /// The sum of the files' sizes.
    pub bytes: u64,
    pub dirs: u64,
    pub errors: u64,
    pub flags: u32,
    /// The top-level entries.
    pub root: List<Entry>,
}

impl SnapshotRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.id.0);
        w.i64(self.time_ns);
        w.str(self.host.as_bytes());
        w.u32(self.paths.len() as u32);
        for p in &self.paths {
            w.str(p.as_bytes());
        }
        for v in [
            self.bytes_read,
            self.bytes_added,
            self.duration_ns,
            self.files,
            self.bytes,
            self.dirs,
            self.errors,
        ] {
            w.u64(v);
        }
        w.u32(self.flags);
        self.root.encode(&mut w);
        seal_as(MAGIC, RECORD_VERSION, &w.buf, true)
    }

    /// Decodes a version 3 record (a version 2 manifest is
    /// [`crate::format::snapshot::Snapshot`]'s).
    ///
    /// # Errors
    /// [`Error::Corrupt`], [`Error::UnsupportedVersion`].
    pub fn decode(bytes: &[u8], object: &str) -> Result<SnapshotRecord> {
        let (version, body) = open_as(MAGIC, bytes, object, RECORD_VERSION)?;
        if version != RECORD_VERSION {
            return Err(Error::corrupt(
                object,
                8,
                format!("a version {version} manifest is not a format 3 record"),
            ));
        }
        let mut r = Reader::new(&body, object);
        let id = r.u64()?;
        if id == 0 {
            return Err(r.corrupt("snapshot id 0"));
        }
        let time_ns = r.i64()?;
        let host =
            String::from_utf8(r.str(1024)?.to_vec()).map_err(|_| r.corrupt("host is not UTF-8"))?;
        let n = r.u32()? as usize;
        if n > r.remaining() / 4 {
            return Err(r.corrupt(format!("{n} paths")));
        }
        let mut paths = Vec::with_capacity(n);
        for _ in 0..n {
            paths.push(
                String::from_utf8(r.str(1 << 16)?.to_vec())
                    .map_err(|_| r.corrupt("path is not UTF-8"))?,
            );
        }
        let mut v = [0u64; 7];
        for x in v.iter_mut() {
            *x = r.u64()?;
        }
        let flags = r.u32()?;
        if flags & !SNAPSHOT_INCOMPLETE != 0 {
            return Err(r.corrupt(format!("unknown snapshot flags {flags:#x}")));
        }
        let root = List::decode(&mut r)?;
        r.finish()?;
        Ok(SnapshotRecord {
            id: SnapshotId(id),
            time_ns,
            host,
            paths,
            bytes_read: v[0],
            bytes_added: v[1],
            duration_ns: v[2],
            files: v[3],
            bytes: v[4],
            dirs: v[5],
            errors: v[6],
            flags,
            root,
        })
    }
}
