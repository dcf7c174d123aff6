//! Sizes and rates as operators write them: `512M`, `1G`, `100M/s`.

/// Parses a size in bytes: a number with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s").trim_end_matches(['B', 'b']);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 512M, 2G, 1048576)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Memory for `vm start`: a size; a bare number means MiB, as in QEMU's `-m`.
pub fn parse_memory_mib(s: &str) -> Result<u64, String> {
    if s.trim().chars().all(|c| c.is_ascii_digit()) {
        return s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a memory size"));
    }
    Ok(parse_bytes(s)? >> 20)
}

pub fn human_bytes(n: u64) -> String {
    let f = n as f64;
    if f >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", f / (1u64 << 30) as f64)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else {
        format!("{n} B")
    }
}

/// A `--max-bandwidth` value: a size per second (clap's value parser).
pub fn bandwidth(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("100M/s"), Ok(100 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }

    #[test]
    fn a_bare_memory_number_means_mebibytes() {
        assert_eq!(parse_memory_mib("512"), Ok(512));
        assert_eq!(parse_memory_mib("1G"), Ok(1024));
    }
}
