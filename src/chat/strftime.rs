//! `strftime_now(format)`, the date helper chat templates call (Llama 3 and others put today's
//! date in the system turn). Python's `datetime.now().strftime` for the directives templates
//! use, computed from the system clock in UTC (no time-zone database is shipped).

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Monday
    pub weekday: u32,
    /// 1..=366
    pub yday: u32,
}

/// Seconds since the Unix epoch to a civil UTC date (Howard Hinnant's `civil_from_days`).
pub fn civil(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][month as usize - 1];
    let yday = before + day + u32::from(leap && month > 2);
    Civil {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem / 60 % 60) as u32,
        second: (rem % 60) as u32,
        // 1970-01-01 was a Thursday.
        weekday: (days + 3).rem_euclid(7) as u32,
        yday,
    }
}

/// Format `t` like Python's `strftime`. Unknown directives are kept as written.
pub fn format(t: &Civil, fmt: &str) -> String {
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let month = MONTHS[t.month as usize - 1];
        let day = DAYS[t.weekday as usize];
        let h12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        let _ = match d {
            'Y' => write!(out, "{}", t.year),
            'y' => write!(out, "{:02}", t.year.rem_euclid(100)),
            'm' => write!(out, "{:02}", t.month),
            'd' => write!(out, "{:02}", t.day),
            'e' => write!(out, "{:>2}", t.day),
            'H' => write!(out, "{:02}", t.hour),
            'I' => write!(out, "{h12:02}"),
            'M' => write!(out, "{:02}", t.minute),
            'S' => write!(out, "{:02}", t.second),
            'p' => write!(out, "{}", if t.hour < 12 { "AM" } else { "PM" }),
            'B' => write!(out, "{month}"),
            'b' | 'h' => write!(out, "{}", &month[..3]),
            'A' => write!(out, "{day}"),
            'a' => write!(out, "{}", &day[..3]),
            'j' => write!(out, "{:03}", t.yday),
            'u' => write!(out, "{}", t.weekday + 1),
            'w' => write!(out, "{}", (t.weekday + 1) % 7),
            'F' => write!(out, "{}-{:02}-{:02}", t.year, t.month, t.day),
            'T' => write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
            'Z' => write!(out, "UTC"),
            'z' => write!(out, "+0000"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// `strftime_now(format)`: the current UTC time.
pub fn now(fmt: &str) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    format(&civil(secs), fmt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_python() {
        // python: datetime.fromtimestamp(1767225599, timezone.utc) = 2025-12-31 23:59:59, Wednesday
        let t = civil(1_767_225_599);
        assert_eq!(
            format(&t, "%Y-%m-%d %H:%M:%S %A %a %j"),
            "2025-12-31 23:59:59 Wednesday Wed 365"
        );
        assert_eq!(format(&t, "%d %b %Y, %I %p %%"), "31 Dec 2025, 11 PM %");
        // 2024-02-29 12:00:00 UTC, Thursday, a leap day.
        let t = civil(1_709_208_000);
        assert_eq!(format(&t, "%B %e, %Y (%u) %j"), "February 29, 2024 (4) 060");
        assert_eq!(format(&civil(0), "%F %T %w"), "1970-01-01 00:00:00 4");
    }
}
