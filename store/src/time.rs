//! Snapshot times as users see them: local time, `YYYY-MM-DDTHH:MM:SS`.

/// Local time of a Unix time in nanoseconds, `YYYY-MM-DDTHH:MM:SS`.
pub fn local(time_ns: i64) -> String {
    let secs = time_ns.div_euclid(1_000_000_000) as libc::time_t;
    // SAFETY: tm is plain data; localtime_r writes it and returns null on failure.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
    if !ok {
        return format!("@{secs}");
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SS` (or with a space, or a bare `YYYY-MM-DD` for
/// midnight) in local time into Unix nanoseconds.
pub fn parse_local(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, t),
        None => (s, "00:00:00"),
    };
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || !(2..=3).contains(&t.len()) {
        return None;
    }
    let num = |x: &str| x.parse::<i32>().ok();
    // SAFETY: tm is plain data; mktime reads it and returns -1 on failure.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = num(d[0])? - 1900;
    tm.tm_mon = num(d[1])? - 1;
    tm.tm_mday = num(d[2])?;
    tm.tm_hour = num(t[0])?;
    tm.tm_min = num(t[1])?;
    tm.tm_sec = t.get(2).map_or(Some(0), |x| num(x))?;
    tm.tm_isdst = -1;
    if !(0..12).contains(&tm.tm_mon)
        || !(1..=31).contains(&tm.tm_mday)
        || !(0..24).contains(&tm.tm_hour)
    {
        return None;
    }
    let secs = unsafe { libc::mktime(&mut tm) };
    if secs == -1 {
        return None;
    }
    Some(secs as i64 * 1_000_000_000)
}

/// Now, in Unix nanoseconds.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = 1_714_532_400_000_000_000;
        let s = local(t);
        assert_eq!(parse_local(&s), Some(t));
        assert_eq!(s.len(), 19);
        assert!(parse_local("2024-13-01").is_none());
        assert!(parse_local("yesterday").is_none());
    }
}
