//! Retention: which snapshots a policy keeps (restic's and borg's meaning),
//! and forgetting snapshots.
//!
//! A policy keeps the newest snapshot of each of the last N hours, days,
//! ISO weeks, months and years that have snapshots, plus the last N
//! snapshots; a snapshot is kept if any rule keeps it. Forgetting removes only
//! manifests (one unlink each, so a crash forgets some or all of them and
//! loses nothing else); the data they alone used is reclaimed by gc.

use crate::backend::Key;
use crate::error::Result;
use crate::format::snapshot::Timed;
use crate::gc::{GcPlan, GcReport};
use crate::id::SnapshotId;
use crate::repo::Repo;

/// How many of each period to keep. Zero keeps none by that rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl KeepPolicy {
    /// True when no rule keeps anything (which would forget every snapshot).
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// The decision for one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub id: SnapshotId,
    pub time_ns: i64,
    /// The rules that keep it ("last", "daily", ...); empty means forget.
    pub reasons: Vec<&'static str>,
}

/// Applies `policy` to snapshots (any order); returns decisions newest first.
pub fn apply<T: Timed>(snaps: &[T], policy: &KeepPolicy) -> Vec<Decision> {
    let mut order: Vec<&T> = snaps.iter().collect();
    order.sort_by_key(|s| std::cmp::Reverse((s.time_ns(), s.id())));
    type Bucket = fn(i64) -> (i32, u32, u32, u32);
    let rules: [(&'static str, u32, Bucket); 5] = [
        ("hourly", policy.hourly, |t| {
            let p = crate::time::local_parts(t);
            (p.0, p.1, p.2, p.3)
        }),
        ("daily", policy.daily, |t| {
            let p = crate::time::local_parts(t);
            (p.0, p.1, p.2, 0)
        }),
        ("weekly", policy.weekly, |t| {
            let p = crate::time::local_parts(t);
            (p.4, p.5, 0, 0)
        }),
        ("monthly", policy.monthly, |t| {
            let p = crate::time::local_parts(t);
            (p.0, p.1, 0, 0)
        }),
        ("yearly", policy.yearly, |t| {
            let p = crate::time::local_parts(t);
            (p.0, 0, 0, 0)
        }),
    ];
    let mut left: Vec<u32> = rules.iter().map(|r| r.1).collect();
    let mut last_bucket: Vec<Option<(i32, u32, u32, u32)>> = vec![None; rules.len()];
    let mut out = Vec::with_capacity(order.len());
    for (i, s) in order.iter().enumerate() {
        let mut reasons = Vec::new();
        if (i as u32) < policy.last {
            reasons.push("last");
        }
        for (k, (name, _, bucket)) in rules.iter().enumerate() {
            let b = bucket(s.time_ns());
            if left[k] > 0 && last_bucket[k] != Some(b) {
                left[k] -= 1;
                last_bucket[k] = Some(b);
                reasons.push(name);
            }
        }
        out.push(Decision {
            id: s.id(),
            time_ns: s.time_ns(),
            reasons,
        });
    }
    out
}

/// Removes the manifests of `ids`. Takes the writer lock. An id given more
/// than once (a snapshot named by its id and by its time) is removed and
/// reported once. Returns the ids forgotten, in id order, each once, for
/// the caller to report.
///
/// # Errors
/// [`crate::Error::Locked`], [`crate::Error::Io`].
pub fn forget(repo: &Repo, ids: &[SnapshotId]) -> Result<Vec<SnapshotId>> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids.dedup();
    let _lock = repo.lock()?;
    let keys: Vec<Key> = ids.iter().map(|&id| Key::snapshot(id)).collect();
    repo.backend().remove(&keys)?;
    Ok(ids)
}

/// What `dsync prune` will do: the policy's decision for every snapshot,
/// and the gc that follows once the forgotten ones are gone.
#[derive(Clone, Debug)]
pub struct PrunePlan {
    /// Kept snapshots, newest first, with the rules that keep them.
    pub kept: Vec<Decision>,
    /// Snapshots to forget, newest first.
    pub forgotten: Vec<Decision>,
    /// The gc over the kept snapshots; its `expected` figures are what
    /// `--dry-run` reports.
    pub gc: GcPlan,
}

/// Plans a prune: `policy` (an empty one forgets nothing) and then a gc
/// repacking packs whose live share is under `repack_below`. Changes
/// nothing; the caller holds the writer lock until it executes the plan.
///
/// # Errors
/// As [`crate::gc::plan`].
pub fn plan(repo: &Repo, policy: &KeepPolicy, repack_below: f64) -> Result<PrunePlan> {
    let (mut kept, mut forgotten) = (Vec::new(), Vec::new());
    if !policy.is_empty() {
        for d in apply(&repo.infos()?, policy) {
            if d.reasons.is_empty() {
                forgotten.push(d);
            } else {
                kept.push(d);
            }
        }
    }
    let ids: Vec<SnapshotId> = forgotten.iter().map(|d| d.id).collect();
    Ok(PrunePlan {
        gc: crate::gc::plan(repo, &ids, repack_below)?,
        kept,
        forgotten,
    })
}

/// Plans a prune under the writer lock and, unless `dry_run`, executes it.
/// Returns the plan and what was done (the plan's expected figures when
/// dry).
///
/// # Errors
/// [`crate::Error::Locked`]; as [`plan`] and [`crate::gc::execute`].
pub fn prune(
    repo: &Repo,
    policy: &KeepPolicy,
    repack_below: f64,
    dry_run: bool,
    progress: &dyn crate::Progress,
) -> Result<(PrunePlan, GcReport)> {
    let _lock = repo.lock()?;
    let p = plan(repo, policy, repack_below)?;
    let report = if dry_run {
        p.gc.expected.clone()
    } else {
        crate::gc::execute(repo, &p.gc, progress)?
    };
    Ok((p, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::snapshot::Snapshot;
    use crate::format::snapshot::SnapshotStats;

    fn snap(id: u64, t: &str) -> Snapshot {
        Snapshot {
            id: SnapshotId(id),
            time_ns: crate::time::parse_local(t).unwrap(),
            host: "h".into(),
            paths: vec![],
            stats: SnapshotStats::default(),
            nodes: vec![],
            format: 2,
        }
    }

    fn kept(snaps: &[Snapshot], p: KeepPolicy) -> Vec<u64> {
        let mut v: Vec<u64> = apply(snaps, &p)
            .into_iter()
            .filter(|d| !d.reasons.is_empty())
            .map(|d| d.id.0)
            .collect();
        v.sort();
        v
    }

    /// Two snapshots a day (03:00 and 15:00) from 2024-01-01 for 400 days.
    fn history() -> Vec<Snapshot> {
        let mut v = Vec::new();
        let start = crate::time::parse_local("2024-01-01T03:00:00").unwrap();
        for d in 0..400i64 {
            for (k, h) in [(0, 0i64), (1, 12)].iter() {
                let t = start + (d * 24 + h) * 3_600_000_000_000;
                let mut s = snap(1, "2024-01-01");
                s.id = SnapshotId((d * 2 + k + 1) as u64);
                s.time_ns = t;
                v.push(s);
            }
        }
        v
    }

    #[test]
    fn keep_last_and_daily() {
        let h = history();
        // The newest 3.
        assert_eq!(
            kept(
                &h,
                KeepPolicy {
                    last: 3,
                    ..Default::default()
                }
            ),
            vec![798, 799, 800]
        );
        // The newest of each of the last 7 days: the 15:00 ones.
        let d = kept(
            &h,
            KeepPolicy {
                daily: 7,
                ..Default::default()
            },
        );
        assert_eq!(d, (393..400).map(|day| day * 2 + 2).collect::<Vec<u64>>());
    }

    #[test]
    fn keep_weekly_monthly_yearly_combine() {
        let h = history();
        let w = kept(
            &h,
            KeepPolicy {
                weekly: 4,
                ..Default::default()
            },
        );
        assert_eq!(w.len(), 4);
        let m = kept(
            &h,
            KeepPolicy {
                monthly: 12,
                ..Default::default()
            },
        );
        assert_eq!(m.len(), 12);
        // Each monthly keeper is the last snapshot of its month.
        for id in &m {
            let s = &h[(*id - 1) as usize];
            let next = h.get(*id as usize);
            if let Some(n) = next {
                let (a, b) = (
                    crate::time::local_parts(s.time_ns),
                    crate::time::local_parts(n.time_ns),
                );
                assert_ne!(
                    (a.0, a.1),
                    (b.0, b.1),
                    "snapshot {id} is not the last of its month"
                );
            }
        }
        let y = kept(
            &h,
            KeepPolicy {
                yearly: 5,
                ..Default::default()
            },
        );
        assert_eq!(y.len(), 2, "two years have snapshots: 2024 and 2025");
        assert_eq!(*y.last().unwrap(), 800);
        // Rules combine: the union.
        let all = kept(
            &h,
            KeepPolicy {
                last: 2,
                daily: 3,
                monthly: 2,
                ..Default::default()
            },
        );
        let mut union: Vec<u64> = kept(
            &h,
            KeepPolicy {
                last: 2,
                ..Default::default()
            },
        );
        union.extend(kept(
            &h,
            KeepPolicy {
                daily: 3,
                ..Default::default()
            },
        ));
        union.extend(kept(
            &h,
            KeepPolicy {
                monthly: 2,
                ..Default::default()
            },
        ));
        union.sort();
        union.dedup();
        assert_eq!(all, union);
        assert!(kept(&h, KeepPolicy::default()).is_empty());
    }

    #[test]
    fn hourly_keeps_one_per_hour() {
        let s = vec![
            snap(1, "2024-05-01T10:05:00"),
            snap(2, "2024-05-01T10:55:00"),
            snap(3, "2024-05-01T11:01:00"),
            snap(4, "2024-05-01T13:00:00"),
        ];
        assert_eq!(
            kept(
                &s,
                KeepPolicy {
                    hourly: 2,
                    ..Default::default()
                }
            ),
            vec![3, 4]
        );
        assert_eq!(
            kept(
                &s,
                KeepPolicy {
                    hourly: 10,
                    ..Default::default()
                }
            ),
            vec![2, 3, 4]
        );
    }

    /// A snapshot named twice is removed once and reported once; the others
    /// stay.
    #[test]
    fn forget_removes_and_reports_an_id_given_twice_once() {
        use crate::backend::MemBackend;
        use crate::backup::{backup_stream, BackupOptions, NoProgress};
        use crate::format::config::Config;
        let m = MemBackend::new();
        let repo = Repo::init_on(std::sync::Arc::new(m.clone()), Config::default()).unwrap();
        let mut ids = Vec::new();
        for day in 0..3i64 {
            let opts = BackupOptions {
                name: Some("f".into()),
                time_ns: Some(1_700_000_000_000_000_000 + day * 86_400_000_000_000),
                ..Default::default()
            };
            let data = crate::testdata::pseudo(4096, day as u64);
            let rep = backup_stream(&repo, &mut &data[..], &opts, &NoProgress).unwrap();
            ids.push(rep.snapshot.id);
        }
        let writes = m.writes();
        let forgot = forget(&repo, &[ids[1], ids[1]]).unwrap();
        assert_eq!(forgot, vec![ids[1]]);
        assert_eq!(m.writes() - writes, 1, "one removal");
        let left: Vec<SnapshotId> = repo.infos().unwrap().iter().map(|i| i.id).collect();
        assert_eq!(left.len(), 2);
        assert!(left.contains(&ids[0]) && left.contains(&ids[2]));
        // In id order, each once, whatever order and repeats they came in.
        let forgot = forget(&repo, &[ids[2], ids[0], ids[2]]).unwrap();
        let mut want = vec![ids[0], ids[2]];
        want.sort();
        assert_eq!(forgot, want);
        assert!(repo.infos().unwrap().is_empty());
    }
}
