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

/// Local calendar fields of a Unix time in nanoseconds: (year, month 1-12,
/// day 1-31, hour 0-23, ISO week-year, ISO week 1-53).
pub fn local_parts(time_ns: i64) -> (i32, u32, u32, u32, i32, u32) {
    let secs = time_ns.div_euclid(1_000_000_000) as libc::time_t;
    // SAFETY: tm is plain data; localtime_r fills it or returns null.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return (1970, 1, 1, 0, 1970, 1);
    }
    let year = tm.tm_year + 1900;
    // ISO 8601 week: the week with the year's first Thursday is week 1.
    let wday = (tm.tm_wday + 6) % 7; // Monday = 0
    let yday = tm.tm_yday; // 0-based
    let mut week = (yday - wday + 10) / 7;
    let mut wyear = year;
    let is_leap = |y: i32| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let weeks_in = |y: i32| {
        // A year has 53 weeks if it starts on Thursday, or is leap and starts on Wednesday.
        let jan1 = (wday - yday).rem_euclid(7); // weekday of Jan 1 of `year`, Monday = 0
        let jan1 = if y == year {
            jan1
        } else {
            (jan1 - if is_leap(y) { 366 } else { 365 }).rem_euclid(7)
        };
        if jan1 == 3 || (jan1 == 2 && is_leap(y)) {
            53
        } else {
            52
        }
    };
    if week < 1 {
        wyear = year - 1;
        week = weeks_in(year - 1);
    } else if week > weeks_in(year) {
        wyear = year + 1;
        week = 1;
    }
    (
        year,
        (tm.tm_mon + 1) as u32,
        tm.tm_mday as u32,
        tm.tm_hour as u32,
        wyear,
        week as u32,
    )
}

#[cfg(test)]
mod parts_tests {
    use super::*;

    fn at(s: &str) -> i64 {
        parse_local(s).unwrap()
    }

    #[test]
    fn iso_weeks() {
        // Known ISO weeks.
        let w = |s: &str| {
            let p = local_parts(at(s));
            (p.4, p.5)
        };
        assert_eq!(w("2024-01-01T12:00:00"), (2024, 1));
        assert_eq!(w("2021-01-03T12:00:00"), (2020, 53));
        assert_eq!(w("2020-12-31T12:00:00"), (2020, 53));
        assert_eq!(w("2019-12-30T12:00:00"), (2020, 1));
        assert_eq!(w("2026-11-24T12:00:00"), (2026, 48));
        assert_eq!(w("2027-01-01T12:00:00"), (2026, 53));
    }
}
