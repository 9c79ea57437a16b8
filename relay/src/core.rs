//! The relay's pure pieces, from the `relay-core` crate, under the path
//! the shell has always used (`crate::core::...`).
//!
//! The lane scheduler is re-exported here too: it lives in relay-link
//! because cells and relays share the link writer that uses it.

pub use relay_core::*;
pub use relay_link::lanes;
pub use relay_link::lanes::{DEFAULT_LANE_WEIGHTS, LANES, LaneScheduler, MAX_LANE_WEIGHT};

use relay_codec::id_table::IdKey;

/// The shell's dedup window: [`relay_core::DedupWindow`] with a hash key
/// drawn at random here, where the OS's randomness may be read (the pure
/// crate takes its key from the caller). Everything else is the pure
/// window's, through `Deref`.
#[derive(Debug)]
pub struct DedupWindow(relay_core::DedupWindow);

impl DedupWindow {
    /// A window remembering ids for at least `window_ms` milliseconds in at
    /// most `capacity` entries, with a random key (see
    /// [`relay_core::DedupWindow::new`], which panics on a `capacity` of 0).
    pub fn new(window_ms: u64, capacity: usize) -> Self {
        Self(relay_core::DedupWindow::new(
            window_ms,
            capacity,
            IdKey::random(),
        ))
    }
}

impl std::ops::Deref for DedupWindow {
    type Target = relay_core::DedupWindow;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for DedupWindow {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
