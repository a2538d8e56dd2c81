//! Unit formatting: bytes (decimal GB as model cards quote them, and binary GiB), counts, context
//! lengths.

/// Decimal bytes: `3.22 GB`, `512 KB`, `96 B`.
pub fn bytes(n: u64) -> String {
    scaled(n as f64, 1000.0, &["B", "KB", "MB", "GB", "TB", "PB"])
}

/// Signed decimal bytes, for savings that can be negative.
pub fn signed_bytes(n: i64) -> String {
    if n < 0 {
        format!("-{}", bytes(n.unsigned_abs()))
    } else {
        bytes(n as u64)
    }
}

/// Parameter counts: `4.63 B`, `403 M`, `1.57 T`.
pub fn params(n: u64) -> String {
    let v = n as f64;
    if v >= 1e12 {
        format!("{:.2} T", v / 1e12)
    } else if v >= 1e9 {
        format!("{:.2} B", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} K", v / 1e3)
    } else {
        format!("{n}")
    }
}

/// FLOPs: `1.2 GFLOP`.
pub fn flops(n: u64) -> String {
    let s = scaled(n as f64, 1000.0, &["", "K", "M", "G", "T", "P"]);
    format!("{s}FLOP")
}

/// Context lengths the way people say them: `4K`, `128K`, `1M`, `40`.
pub fn context(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

/// A number without trailing zeros, with K/M suffixes for round thousands: `10K`, `1M`, `5e6`.
pub fn compact_number(x: f64) -> String {
    if x >= 1e6 && x % 1e6 == 0.0 {
        format!("{}M", x / 1e6)
    } else if x >= 1e3 && x % 1e3 == 0.0 {
        format!("{}K", x / 1e3)
    } else {
        format!("{x}")
    }
}

fn scaled(mut v: f64, step: f64, units: &[&str]) -> String {
    let mut i = 0;
    while v >= step && i + 1 < units.len() {
        v /= step;
        i += 1;
    }
    let unit = units[i];
    if i == 0 || v >= 100.0 {
        format!("{v:.0} {unit}")
    } else if v >= 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.2} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(3_221_225_472), "3.22 GB");
        assert_eq!(bytes(96), "96 B");
        assert_eq!(context(131_072), "128K");
        assert_eq!(context(1 << 20), "1M");
        assert_eq!(context(40), "40");
        assert_eq!(params(4_629_000_000), "4.63 B");
        assert_eq!(compact_number(10_000.0), "10K");
        assert_eq!(signed_bytes(-2048), "-2.05 KB");
    }
}
