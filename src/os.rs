//! Operating-system specifics, one concern per function, behind `cfg`: the service's
//! signals, free disk space, owner-only permissions. Everything else in the crate is
//! portable.

use std::io;
use std::path::Path;

/// SIGTERM, SIGINT and SIGHUP, caught from the moment of installation (so a signal that
/// arrives during start-up is not lost).
/// What a signal asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceSignal {
    /// SIGTERM or SIGINT: stop.
    Stop(&'static str),
    /// SIGHUP: read the configuration again.
    Reload,
}

#[cfg(unix)]
pub struct ServiceSignals(crossbeam_channel::Receiver<ServiceSignal>);

#[cfg(unix)]
impl ServiceSignals {
    /// Catches the signals from now on; a thread ("es-signals") hands them over as they come.
    pub fn install() -> io::Result<ServiceSignals> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let (sender, receiver) = crossbeam_channel::bounded(16);
        std::thread::Builder::new()
            .name("es-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    let signal = match signal {
                        SIGHUP => ServiceSignal::Reload,
                        SIGINT => ServiceSignal::Stop("SIGINT"),
                        _ => ServiceSignal::Stop("SIGTERM"),
                    };
                    if sender.send(signal).is_err() {
                        return;
                    }
                }
            })?;
        Ok(ServiceSignals(receiver))
    }

    /// Waits up to `timeout` for a signal.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Option<ServiceSignal> {
        self.0.recv_timeout(timeout).ok()
    }
}

#[cfg(not(unix))]
pub struct ServiceSignals;

#[cfg(not(unix))]
impl ServiceSignals {
    pub fn install() -> io::Result<ServiceSignals> {
        Ok(ServiceSignals)
    }

    /// Windows service control integration comes with the Windows build.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Option<ServiceSignal> {
        std::thread::sleep(timeout);
        None
    }
}

/// `statvfs` of the filesystem holding `path`.
#[cfg(unix)]
fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a valid out-pointer.
    let result = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat)
}

/// Bytes available to this process on the filesystem holding `path`.
#[cfg(unix)]
pub fn disk_free_bytes(path: &Path) -> io::Result<u64> {
    let stat = statvfs(path)?;
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Total bytes of the filesystem holding `path`.
#[cfg(unix)]
pub fn disk_total_bytes(path: &Path) -> io::Result<u64> {
    let stat = statvfs(path)?;
    Ok(stat.f_blocks as u64 * stat.f_frsize as u64)
}

#[cfg(not(unix))]
pub fn disk_total_bytes(_path: &Path) -> io::Result<u64> {
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(not(unix))]
pub fn disk_free_bytes(_path: &Path) -> io::Result<u64> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Restricts a file or directory to its owner.
#[cfg(unix)]
pub fn make_owner_only(path: &Path, directory: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if directory { 0o700 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
pub fn make_owner_only(_path: &Path, _directory: bool) -> io::Result<()> {
    Ok(())
}

/// Resident set size of this process, in bytes, when the platform tells.
#[cfg(target_os = "linux")]
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(not(target_os = "linux"))]
pub fn resident_bytes() -> Option<u64> {
    None
}

/// Raises the soft limit on open files to the hard limit; returns the limit now in force.
#[cfg(unix)]
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every Unix
    Ok(limit.rlim_cur as u64)
}

#[cfg(not(unix))]
pub fn raise_open_files_limit() -> io::Result<u64> {
    Ok(u64::MAX)
}

/// The machine's host name, if it has one.
#[cfg(unix)]
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is a valid buffer of the length given; gethostname NUL-terminates within it
    // (or truncates, which the search for the NUL below handles).
    let result = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if result != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

#[cfg(not(unix))]
pub fn host_name() -> Option<String> {
    std::env::var("COMPUTERNAME").ok()
}

/// Every IPv4 and IPv6 address of the machine's network interfaces.
#[cfg(unix)]
pub fn interface_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list freed by freeifaddrs below; each node
    // and its address are read only while the list lives, and only for the families named.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut node = list;
        while !node.is_null() {
            let address = (*node).ifa_addr;
            if !address.is_null() {
                match i32::from((*address).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(address as *const libc::sockaddr_in);
                        out.push(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                            u32::from_be(v4.sin_addr.s_addr),
                        )));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(address as *const libc::sockaddr_in6);
                        out.push(std::net::IpAddr::V6(std::net::Ipv6Addr::from(
                            v6.sin6_addr.s6_addr,
                        )));
                    }
                    _ => {}
                }
            }
            node = (*node).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(not(unix))]
pub fn interface_addresses() -> Vec<std::net::IpAddr> {
    Vec::new()
}

/// Puts the calling thread at the lowest CPU and disk priority the system has: on Linux the
/// `SCHED_IDLE` policy (it runs only when no other thread wants the CPU) and the idle I/O
/// class. Returns what was applied, for the log.
#[cfg(target_os = "linux")]
pub fn lower_thread_priority() -> Result<&'static str, io::Error> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler with pid 0 (the calling thread) and a valid parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        let error = io::Error::last_os_error();
        // SAFETY: setpriority on the calling thread (who 0); a raised nice value needs no
        // privilege.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
            return Err(error);
        }
        return Ok("nice 19");
    }
    // ioprio_set(IOPRIO_WHO_PROCESS, 0: this thread, IOPRIO_CLASS_IDLE << 13). Best effort.
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    // SAFETY: a plain system call on the calling thread, with integer arguments only.
    let io_idle = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        )
    } == 0;
    Ok(if io_idle {
        "SCHED_IDLE, idle I/O class"
    } else {
        "SCHED_IDLE"
    })
}

#[cfg(not(target_os = "linux"))]
pub fn lower_thread_priority() -> Result<&'static str, io::Error> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "thread priorities are not set on this platform",
    ))
}

/// CPU time the calling thread has used, in nanoseconds.
#[cfg(unix)]
pub fn thread_cpu_ns() -> u64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid out-pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) } != 0 {
        return 0;
    }
    #[allow(clippy::unnecessary_cast)]
    (time.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(time.tv_nsec as u64)
}

#[cfg(not(unix))]
pub fn thread_cpu_ns() -> u64 {
    0
}

/// Run as the service account `name` from now on, when running as root (an admin command on
/// the installed system: what it creates in the data directory stays the service's). Not
/// root: nothing to do. The account must exist.
#[cfg(unix)]
pub fn become_service_account(name: &str) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let c_name = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: getpwnam with a valid NUL-terminated name; the record is read before any other
    // call that could overwrite it.
    let (uid, gid) = unsafe {
        let record = libc::getpwnam(c_name.as_ptr());
        if record.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no account {name}"),
            ));
        }
        ((*record).pw_uid, (*record).pw_gid)
    };
    // SAFETY: plain system calls with values from the account record; the order (groups,
    // group, user) is the one that can still succeed at each step.
    unsafe {
        if libc::setgroups(1, &gid) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::setgid(gid) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::setuid(uid) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn become_service_account(_name: &str) -> io::Result<()> {
    Ok(())
}
