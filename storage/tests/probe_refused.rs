//! Where io_uring is refused: a child process (this binary re-executed)
//! installs a seccomp filter that answers `io_uring_setup` with EPERM, as a
//! container's default profile does, and checks that the probe says so,
//! that `Auto` runs the portable writer with that reason, that asking for
//! io_uring is a clear error, and that the log works.

mod common;

use std::process::Command;

use common::{config, open_collect};
use relay_storage::record::RecordKind;
use relay_storage::{BackendChoice, BackendKind, Log, StorageError, probe_io_uring};

const CHILD_VAR: &str = "RELAY_STORAGE_SECCOMP_CHILD";

/// Makes `io_uring_setup` fail with EPERM in this thread and the threads it
/// starts from now on.
fn refuse_io_uring() -> Result<(), std::io::Error> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let filter = [
        // Load seccomp_data.nr.
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a filter program that outlives the call (the
    // kernel copies it).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn seccomp_child() {
    if std::env::var(CHILD_VAR).is_err() {
        return;
    }
    if let Err(e) = refuse_io_uring() {
        println!("\nSECCOMP-UNAVAILABLE {e}");
        return;
    }
    let probe = probe_io_uring();
    assert!(!probe.available, "{probe:?}");
    assert!(probe.reason.contains("EPERM"), "{probe:?}");
    let dir = tempfile::tempdir().unwrap();
    let (log, report, _) = open_collect(&config(dir.path(), BackendChoice::Auto));
    assert_eq!(report.backend, BackendKind::Portable);
    assert!(report.backend_reason.contains("EPERM"), "{report}");
    let loc = log
        .append_wait(RecordKind::Message, b"still durable")
        .unwrap();
    assert_eq!(log.read(&loc).unwrap(), b"still durable");
    drop(log);
    let err = Log::open(config(dir.path(), BackendChoice::IoUring), |_, _, _| {}).unwrap_err();
    assert!(matches!(err, StorageError::BadConfig(_)), "{err:?}");
    assert!(err.to_string().contains("EPERM"), "{err}");
    println!("\nSECCOMP-CHECKED {report}");
}

#[test]
fn refused_io_uring_falls_back_to_portable_with_the_reason() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_VAR, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(why) = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SECCOMP-UNAVAILABLE "))
    {
        println!("SKIPPED: seccomp filters refused here: {why}");
        return;
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SECCOMP-CHECKED "))
        .unwrap_or_else(|| panic!("child did not run its checks: {stdout}"));
    println!("{line}");
}
