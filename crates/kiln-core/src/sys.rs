//! Facts about the running process.

/// The process's peak resident set size in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// `VmHWM: 1234 kB` in a `/proc/<pid>/status` text -> MiB.
pub fn parse_vm_hwm(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub use kiln_kernels::memory::release_free_heap;

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_high_water_mark() {
        assert_eq!(super::parse_vm_hwm("Name:\tx\nVmHWM:\t  2048 kB\n"), Some(2.0));
        assert_eq!(super::parse_vm_hwm("Name:\tx\n"), None);
        assert!(super::peak_rss_mib().is_some_and(|m| m > 0.0));
    }
}
