//! Segment files: naming, preallocation and the directory lock.
//!
//! A segment is `<id as 16 hex digits>.seg`, preallocated to its full size
//! with `fallocate` so that appends never need new blocks (a full disk shows
//! up when a segment is created, as a refused append, never as a failed
//! write of records already accepted). It is first created under a `.tmp`
//! name and renamed once allocated and synced, so a half-made segment never
//! looks like part of the log.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::StorageError;

/// Name of the lock file in a log directory.
const LOCK_FILE: &str = "LOCK";
const SEGMENT_EXT: &str = "seg";
const TMP_EXT: &str = "tmp";

/// Path of segment `id` in `dir`.
pub(crate) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.{SEGMENT_EXT}"))
}

/// Takes the exclusive `flock` of `dir`, held as long as the returned file
/// is open. Fails with [`StorageError::Locked`] if anyone holds it.
pub(crate) fn lock_dir(dir: &Path) -> Result<File, StorageError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io("open", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StorageError::Locked(dir.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(StorageError::io("flock", &path, e)),
    }
}

/// Ids of the segments in `dir`, oldest first. Removes leftover `.tmp`
/// files of segments whose creation was interrupted.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut ids = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| StorageError::io("read_dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("read_dir", dir, e))?;
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str());
        let stem = path.file_stem().and_then(|s| s.to_str());
        match (ext, stem) {
            (Some(SEGMENT_EXT), Some(stem)) => {
                if let Ok(id) = u64::from_str_radix(stem, 16) {
                    ids.push(id);
                }
            }
            (Some(TMP_EXT), Some(_)) => {
                fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
            }
            _ => {}
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Opens an existing segment for reading and writing.
pub(crate) fn open_segment(dir: &Path, id: u64) -> Result<File, StorageError> {
    let path = segment_path(dir, id);
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io("open", &path, e))
}

/// Creates segment `id` of `len` bytes, fully allocated, synced and named
/// in a synced directory. ENOSPC while allocating is [`StorageError::DiskFull`]
/// and leaves nothing behind.
pub(crate) fn create_segment(dir: &Path, id: u64, len: u64) -> Result<File, StorageError> {
    let path = segment_path(dir, id);
    let tmp = path.with_extension(TMP_EXT);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| StorageError::io("create", &tmp, e))?;
    let cleanup = |err: StorageError| {
        let _ = fs::remove_file(&tmp);
        err
    };
    let len_off = libc::off_t::try_from(len)
        .map_err(|_| cleanup(StorageError::BadConfig(format!("segment size {len}"))))?;
    // SAFETY: fallocate on an fd we own, with plain integer arguments.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOSPC) {
            return Err(cleanup(StorageError::DiskFull(dir.to_path_buf())));
        }
        return Err(cleanup(StorageError::io("fallocate", &tmp, err)));
    }
    file.sync_all()
        .map_err(|e| cleanup(StorageError::io("fsync", &tmp, e)))?;
    fs::rename(&tmp, &path).map_err(|e| cleanup(StorageError::io("rename", &tmp, e)))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Removes segment `id` (the caller syncs the directory afterwards).
pub(crate) fn remove_segment(dir: &Path, id: u64) -> Result<(), StorageError> {
    let path = segment_path(dir, id);
    fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))
}

/// fsyncs a directory so that file creations, renames and removals in it
/// survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("fsync", dir, e))
}
