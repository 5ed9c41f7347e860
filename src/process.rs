//! Facts about this process that the transport (connection caps) and the
//! metrics (`process_max_fds`) both read. A leaf.

/// The soft limit on open files (`RLIMIT_NOFILE`), read from
/// `/proc/self/limits`; `None` where that cannot be read or is unlimited.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
