//! `config`: the repository's parameters, fixed at `dsync init`.

use super::{Reader, Writer};

/// The format version of a repository whose snapshots are format 3.
pub const FORMAT_3: u32 = 3;
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"DSYNCCFG";

/// Parameters every writer and reader of a repository must agree on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Random id of the repository.
    pub repo_id: u64,
    /// Signature block size in bytes (a power of two).
    pub block_size: u32,
    /// Signature entries per signature page.
    pub page_entries: u32,
    /// Most uncompressed bytes in one pack frame.
    pub frame_size: u32,
    /// zstd level for pack frames.
    pub zstd_level: i32,
    /// A pack is closed once it holds this many compressed bytes.
    pub pack_target: u64,
    /// The format new snapshots are written in (2, or 3: FORMAT.md "Format
    /// 3"); the config's envelope version, not a body field, so that a
    /// dsync that knows only format 2 refuses a format 3 repository.
    pub format: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            repo_id: crate::id::random_u64(),
            block_size: 4096,
            page_entries: 256,
            frame_size: 32 * 1024,
            zstd_level: 1,
            pack_target: 64 << 20,
            format: 3,
        }
    }
}

impl Config {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.repo_id);
        w.u32(self.block_size);
        w.u32(self.page_entries);
        w.u32(self.frame_size);
        w.u32(self.zstd_level as u32);
        w.u64(self.pack_target);
        super::seal_as(MAGIC, self.format.max(2), &w.buf, false)
    }

    /// # Errors
    /// [`Error::Corrupt`] when the file is damaged or a parameter is out of range.
    pub fn decode(bytes: &[u8], object: &str) -> Result<Config> {
        let (version, body) = super::open_as(MAGIC, bytes, object, FORMAT_3)?;
        let mut r = Reader::new(&body, object);
        let c = Config {
            repo_id: r.u64()?,
            block_size: r.u32()?,
            page_entries: r.u32()?,
            frame_size: r.u32()?,
            zstd_level: r.u32()? as i32,
            pack_target: r.u64()?,
            format: version.max(2),
        };
        r.finish()?;
        if let Some(what) = c.out_of_range() {
            return Err(Error::corrupt(object, 0, format!("{what} out of range")));
        }
        Ok(c)
    }

    /// Checks the parameters as a reader of the config does, so that a
    /// repository is never created that no dsync could open (`dsync init`
    /// calls it before creating anything; [`crate::Repo::init`] too).
    ///
    /// # Errors
    /// [`Error::UnsupportedVersion`] for a format newer than this build
    /// reads; [`Error::InvalidInput`] naming the first parameter out of
    /// range.
    pub fn validate(&self) -> Result<()> {
        if self.format > FORMAT_3 {
            return Err(Error::UnsupportedVersion {
                path: "config".into(),
                found: self.format,
                supported: FORMAT_3,
            });
        }
        match self.out_of_range() {
            Some(what) => Err(Error::InvalidInput(format!("{what} out of range"))),
            None => Ok(()),
        }
    }

    /// The first parameter outside the range every reader accepts (the
    /// table in FORMAT.md, "Config"), by name.
    fn out_of_range(&self) -> Option<&'static str> {
        if !super::valid_block_size(self.block_size) {
            return Some("block size");
        }
        if !super::valid_page_entries(self.page_entries) {
            return Some("page entries");
        }
        if !(4096..=super::pack::MAX_FRAME).contains(&self.frame_size) {
            return Some("frame size");
        }
        if !(-7..=22).contains(&self.zstd_level) {
            return Some("zstd level");
        }
        if !(1 << 20..=1 << 36).contains(&self.pack_target) {
            return Some("pack target");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = Config::default();
        assert_eq!(Config::decode(&c.encode(), "config").unwrap(), c);
    }

    #[test]
    fn validate_names_the_parameter_out_of_range() {
        let ok = Config::default();
        assert!(ok.validate().is_ok());
        let bad = |c: Config| c.validate().unwrap_err().to_string();
        assert_eq!(
            bad(Config {
                frame_size: 1024,
                ..ok.clone()
            }),
            "frame size out of range"
        );
        assert_eq!(
            bad(Config {
                zstd_level: 23,
                ..ok.clone()
            }),
            "zstd level out of range"
        );
        assert!(matches!(
            Config { format: 4, ..ok }.validate(),
            Err(Error::UnsupportedVersion { found: 4, .. })
        ));
    }

    proptest::proptest! {
        /// `validate` accepts exactly the configs a reader decodes.
        #[test]
        fn validate_agrees_with_decode(
            block_size in proptest::sample::select(vec![0u32, 256, 512, 4096, 4097, 1 << 20, 1 << 21]),
            page_entries in 0u32..70_000,
            frame_size in 0u32..5 << 20,
            zstd_level in -10i32..25,
            pack_target in 0u64..1 << 37,
            format in 0u32..5,
        ) {
            let c = Config { repo_id: 7, block_size, page_entries, frame_size, zstd_level, pack_target, format };
            proptest::prop_assert_eq!(
                c.validate().is_ok(),
                Config::decode(&c.encode(), "config").is_ok()
            );
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = Config::decode(&bytes, "c");
            // And behind a valid envelope, so the body checks run.
            let _ = Config::decode(&crate::format::seal(MAGIC, &bytes, false), "c");
        }
    }
}
