//! Bounds applied while decoding.

/// The bounds a decoder enforces. A link agrees on them at handshake; a value
/// over a bound is refused before anything is allocated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message payload, in bytes. Hard cap [`Limits::MAX_PAYLOAD_CAP`].
    pub max_payload: usize,
    /// Largest frame, in bytes, counted after its length prefix, and the
    /// largest a compressed batch may expand to. Hard cap [`Limits::MAX_FRAME_CAP`].
    pub max_frame: usize,
    /// Most messages in one batch frame.
    pub max_batch_messages: usize,
    /// Most services one cell may announce.
    pub max_services: usize,
}

impl Limits {
    /// No configuration may raise a payload above this (16 MiB).
    pub const MAX_PAYLOAD_CAP: usize = 16 << 20;
    /// No configuration may raise a frame above this (64 MiB).
    pub const MAX_FRAME_CAP: usize = 64 << 20;
    /// A batch count is a `u16` on the wire.
    pub const MAX_BATCH_CAP: usize = u16::MAX as usize;
    /// A service list length is a `u8` on the wire.
    pub const MAX_SERVICES_CAP: usize = u8::MAX as usize;

    /// These limits clamped to the hard caps, so a decoder never trusts an
    /// impossible configuration.
    pub fn clamped(self) -> Self {
        Self {
            max_payload: self.max_payload.min(Self::MAX_PAYLOAD_CAP),
            max_frame: self.max_frame.min(Self::MAX_FRAME_CAP),
            max_batch_messages: self.max_batch_messages.min(Self::MAX_BATCH_CAP),
            max_services: self.max_services.min(Self::MAX_SERVICES_CAP),
        }
    }
}

impl Default for Limits {
    /// 1 MiB payloads, 4 MiB frames, 4096 messages per batch, 16 services.
    fn default() -> Self {
        Self {
            max_payload: 1 << 20,
            max_frame: 4 << 20,
            max_batch_messages: 4096,
            max_services: 16,
        }
    }
}
