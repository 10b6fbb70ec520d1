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

/// Hand the heap's free pages back to the system (glibc's `malloc_trim`; nothing
/// elsewhere). Freed small allocations stay resident otherwise: after a load whose
/// transient data dwarfs what it keeps (a 262,144-token tokenizer's parse), the next
/// large allocation would sit on top of them in the peak RSS.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim takes any pad and only returns free pages.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_high_water_mark() {
        assert_eq!(super::parse_vm_hwm("Name:\tx\nVmHWM:\t  2048 kB\n"), Some(2.0));
        assert_eq!(super::parse_vm_hwm("Name:\tx\n"), None);
        assert!(super::peak_rss_mib().is_some_and(|m| m > 0.0));
    }
}
