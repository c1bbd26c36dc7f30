//! The process's CPU quota, from its cgroup: how many cores' worth of time the kernel lets it
//! use, whatever the machine has. A container limited to `cpu: 250m` has a quota of 0.25.
//!
//! Read from cgroup v2's `cpu.max` or cgroup v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` at
//! the cgroup root the process sees, which in a container (with its own cgroup namespace) is the
//! container's own cgroup.

use std::path::Path;

const ROOT: &str = "/sys/fs/cgroup";

/// The CPU quota in cores, or None when there is none (or it cannot be read).
pub fn cpu_quota() -> Option<f64> {
    let root = Path::new(ROOT);
    if let Ok(max) = std::fs::read_to_string(root.join("cpu.max")) {
        return parse_cpu_max(&max);
    }
    let quota = std::fs::read_to_string(root.join("cpu/cpu.cfs_quota_us")).ok()?;
    let period = std::fs::read_to_string(root.join("cpu/cpu.cfs_period_us")).ok()?;
    parse_cfs(&quota, &period)
}

/// cgroup v2 `cpu.max`: "QUOTA PERIOD" in microseconds, QUOTA "max" for none.
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period: f64 = fields.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    Some(quota.parse::<f64>().ok()? / period)
}

/// cgroup v1: `cpu.cfs_quota_us` (-1 for none) over `cpu.cfs_period_us`.
fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period: f64 = period.trim().parse().ok()?;
    if quota <= 0.0 || period <= 0.0 {
        return None;
    }
    Some(quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_cpu_max() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("25000 100000\n"), Some(0.25));
        assert_eq!(parse_cpu_max("200000 100000"), Some(2.0));
        assert_eq!(parse_cpu_max("garbage"), None);
    }

    #[test]
    fn cgroup_v1_cfs() {
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("50000\n", "100000\n"), Some(0.5));
        assert_eq!(parse_cfs("x", "100000"), None);
    }
}
