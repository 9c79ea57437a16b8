//! Several channels of frames over one ordered byte stream: how a TCP link
//! carries its control channel and its four lanes on one TLS connection.
//!
//! The stream is a sequence of chunks (`docs/PROTOCOL.md`, section 6.3):
//!
//! ```text
//! u8   channel: 0 the control channel, 1..=4 the lanes control, high,
//!      normal, bulk (1 + Lane::index)
//! u16  length of the payload that follows, little-endian; 0 ends the
//!      channel (no payload follows and the channel carries nothing more)
//! ...  payload: the next `length` bytes of that channel's frames
//! ```
//!
//! Each channel's payloads, concatenated in order, are a sequence of whole
//! frames exactly as on a QUIC stream (section 4: a `u32` length prefix,
//! the type, the body). A frame may be cut anywhere into chunks, and chunks
//! of different channels interleave freely, so a writer that cuts bulk
//! frames into chunks of at most N bytes makes a control frame wait behind
//! at most one chunk of them.
//!
//! [`Demux`] is the receiving side: pure, allocation bounded by
//! [`Limits::max_frame`] per channel (at most one partial frame per channel),
//! every violation a typed [`MuxError`].

use crate::frame::{CloseCode, LEN_PREFIX};
use crate::limits::Limits;
use crate::message::Lane;
use bytes::{Bytes, BytesMut};

/// Bytes of a chunk header: channel (1) and payload length (2).
pub const CHUNK_HEADER: usize = 3;
/// Largest payload one chunk can carry (the length is a `u16`).
pub const MAX_CHUNK: usize = u16::MAX as usize;
/// The payload size a writer cuts frames into unless told otherwise: a
/// chunk and its header fill exactly one 16 KiB TLS record, so no record
/// is split, and control waits behind at most one record of bulk data
/// in the writer (the choice is measured in `link/examples/link_probe.rs`).
pub const DEFAULT_CHUNK: usize = 16 * 1024 - CHUNK_HEADER;
/// Number of channels: the control channel and the four lanes.
pub const CHANNELS: usize = 5;

/// One of the multiplexed channels of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The control channel: Hello, Welcome, Close and the other control
    /// frames (QUIC: the first bidirectional stream).
    Control,
    /// The batches of one lane (QUIC: that lane's unidirectional stream).
    Lane(Lane),
}

impl Channel {
    /// Every channel, in id order.
    pub const ALL: [Channel; CHANNELS] = [
        Channel::Control,
        Channel::Lane(Lane::Control),
        Channel::Lane(Lane::High),
        Channel::Lane(Lane::Normal),
        Channel::Lane(Lane::Bulk),
    ];

    /// The channel's wire id: 0 for control, `1 + lane index` for a lane.
    pub fn id(self) -> u8 {
        match self {
            Channel::Control => 0,
            Channel::Lane(lane) => 1 + lane as u8,
        }
    }

    /// The channel with wire id `id`, if there is one.
    pub fn from_id(id: u8) -> Option<Channel> {
        Channel::ALL.get(usize::from(id)).copied()
    }

    /// The channel's index in `0..CHANNELS` (its id).
    pub fn index(self) -> usize {
        usize::from(self.id())
    }
}

/// The header of a chunk carrying `len` payload bytes of `channel`
/// (`len` 0: the end of the channel).
pub fn chunk_header(channel: Channel, len: u16) -> [u8; CHUNK_HEADER] {
    let [lo, hi] = len.to_le_bytes();
    [channel.id(), lo, hi]
}

/// Why a multiplexed byte stream was refused. Each is the peer's fault; the
/// link is closed with [`MuxError::close_code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// A chunk names a channel that does not exist.
    #[error("chunk for channel {0}, which does not exist (channels are 0 to 4)")]
    UnknownChannel(u8),
    /// A frame's length prefix is over the frame limit.
    #[error("frame of {len} bytes on channel {channel:?}, over the limit of {limit}")]
    FrameTooLarge {
        /// Where.
        channel: Channel,
        /// The length the prefix announced.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// A frame's length prefix is zero (a frame holds at least its type).
    #[error("empty frame (length 0) on channel {0:?}")]
    EmptyFrame(Channel),
    /// A chunk arrived on a channel its sender had already ended.
    #[error("data on channel {0:?} after its end")]
    AfterEnd(Channel),
    /// A channel was ended in the middle of a frame.
    #[error("channel {0:?} ended inside a frame")]
    EndInsideFrame(Channel),
    /// The stream ended in the middle of a chunk.
    #[error("the stream ended inside a chunk")]
    EndedInsideChunk,
    /// The stream ended while a channel held part of a frame.
    #[error("the stream ended inside a frame on channel {0:?}")]
    EndedInsideFrame(Channel),
}

impl MuxError {
    /// The code a link is closed with for this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            MuxError::FrameTooLarge { .. } => CloseCode::Oversize,
            _ => CloseCode::Malformed,
        }
    }
}

/// What [`Demux::feed`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// One whole frame of `channel`, with its length prefix (ready for
    /// [`Frame::decode`](crate::Frame::decode)).
    Frame {
        /// Where it travelled.
        channel: Channel,
        /// The frame, length prefix included.
        frame: Bytes,
    },
    /// The sender ended `channel`: it carries nothing more.
    End(Channel),
}

/// Where the demultiplexer is within the chunk sequence.
#[derive(Clone, Copy, Debug)]
enum ChunkState {
    /// Reading a chunk header; `have` of its bytes are in `buf`.
    Header {
        buf: [u8; CHUNK_HEADER],
        have: usize,
    },
    /// Inside the payload of a chunk of channel index `channel`, `left`
    /// bytes still to come.
    Payload { channel: usize, left: usize },
}

const HEADER_START: ChunkState = ChunkState::Header {
    buf: [0; CHUNK_HEADER],
    have: 0,
};

/// One channel's frame being reassembled.
#[derive(Debug, Default)]
struct Reassembly {
    /// The frame's length prefix while it is incomplete.
    prefix: [u8; LEN_PREFIX],
    /// Bytes of `prefix` received (`LEN_PREFIX` once the frame has begun).
    have_prefix: usize,
    /// The frame so far, prefix included; allocated once for the whole
    /// frame when the prefix is complete and checked.
    frame: BytesMut,
    /// Total bytes of the frame (prefix included) once its prefix is known.
    want: usize,
    /// The sender ended the channel.
    ended: bool,
}

impl Reassembly {
    /// Whether part of a frame is held.
    fn inside_frame(&self) -> bool {
        self.have_prefix > 0
    }
}

/// Splits a multiplexed byte stream back into each channel's frames.
///
/// Feed it the stream in pieces of any size; it yields each frame when its
/// last byte arrives. It holds at most one partial frame per channel, each
/// at most `LEN_PREFIX + max_frame` bytes (allocated when the frame's
/// checked length prefix arrives), and nothing else that grows.
#[derive(Debug)]
pub struct Demux {
    max_frame: usize,
    chunk: ChunkState,
    channels: [Reassembly; CHANNELS],
}

impl Demux {
    /// A demultiplexer refusing frames over `limits.max_frame` (clamped to
    /// [`Limits::MAX_FRAME_CAP`]).
    pub fn new(limits: &Limits) -> Self {
        Self {
            max_frame: limits.max_frame.min(Limits::MAX_FRAME_CAP),
            chunk: HEADER_START,
            channels: Default::default(),
        }
    }

    /// Consumes bytes from the front of `input` until it completes a frame
    /// or a channel's end (returned, with `input` advanced past it) or
    /// `input` is empty (`Ok(None)`). Call again until `Ok(None)`.
    ///
    /// After an error the demultiplexer's state is unspecified; the stream
    /// must be abandoned.
    pub fn feed(&mut self, input: &mut &[u8]) -> Result<Option<Event>, MuxError> {
        loop {
            if input.is_empty() {
                return Ok(None);
            }
            match self.chunk {
                ChunkState::Header { mut buf, have } => {
                    let n = (CHUNK_HEADER - have).min(input.len());
                    buf[have..have + n].copy_from_slice(&input[..n]);
                    *input = &input[n..];
                    if have + n < CHUNK_HEADER {
                        self.chunk = ChunkState::Header {
                            buf,
                            have: have + n,
                        };
                        continue;
                    }
                    self.chunk = HEADER_START;
                    let channel =
                        Channel::from_id(buf[0]).ok_or(MuxError::UnknownChannel(buf[0]))?;
                    let len = usize::from(u16::from_le_bytes([buf[1], buf[2]]));
                    let r = &mut self.channels[channel.index()];
                    if r.ended {
                        return Err(MuxError::AfterEnd(channel));
                    }
                    if len == 0 {
                        if r.inside_frame() {
                            return Err(MuxError::EndInsideFrame(channel));
                        }
                        r.ended = true;
                        return Ok(Some(Event::End(channel)));
                    }
                    self.chunk = ChunkState::Payload {
                        channel: channel.index(),
                        left: len,
                    };
                }
                ChunkState::Payload { channel, left } => {
                    let (used, frame) = self.payload(channel, left, input)?;
                    *input = &input[used..];
                    self.chunk = match left - used {
                        0 => HEADER_START,
                        left => ChunkState::Payload { channel, left },
                    };
                    if let Some(frame) = frame {
                        return Ok(Some(Event::Frame {
                            channel: Channel::ALL[channel],
                            frame,
                        }));
                    }
                }
            }
        }
    }

    /// Takes payload bytes of channel index `ci` (at most `left`) from
    /// `input`: how many it took, and the frame they completed, if any.
    fn payload(
        &mut self,
        ci: usize,
        left: usize,
        input: &[u8],
    ) -> Result<(usize, Option<Bytes>), MuxError> {
        let max_frame = self.max_frame;
        let r = &mut self.channels[ci];
        let avail = left.min(input.len());
        if r.have_prefix < LEN_PREFIX {
            let n = (LEN_PREFIX - r.have_prefix).min(avail);
            r.prefix[r.have_prefix..r.have_prefix + n].copy_from_slice(&input[..n]);
            r.have_prefix += n;
            if r.have_prefix < LEN_PREFIX {
                return Ok((n, None));
            }
            let channel = Channel::ALL[ci];
            let len = u32::from_le_bytes(r.prefix) as usize;
            if len == 0 {
                return Err(MuxError::EmptyFrame(channel));
            }
            if len > max_frame {
                return Err(MuxError::FrameTooLarge {
                    channel,
                    len,
                    limit: max_frame,
                });
            }
            r.want = LEN_PREFIX + len;
            r.frame = BytesMut::with_capacity(r.want);
            r.frame.extend_from_slice(&r.prefix);
            return Ok((n, None));
        }
        let n = (r.want - r.frame.len()).min(avail);
        r.frame.extend_from_slice(&input[..n]);
        if r.frame.len() < r.want {
            return Ok((n, None));
        }
        // Whole: hand the buffer over; the next frame allocates its own.
        let frame = std::mem::take(&mut r.frame).freeze();
        r.have_prefix = 0;
        r.want = 0;
        Ok((n, Some(frame)))
    }

    /// Checks that the stream may end here: between chunks, with no channel
    /// holding part of a frame.
    pub fn finish(&self) -> Result<(), MuxError> {
        if !matches!(self.chunk, ChunkState::Header { have: 0, .. }) {
            return Err(MuxError::EndedInsideChunk);
        }
        match Channel::ALL
            .iter()
            .find(|c| self.channels[c.index()].inside_frame())
        {
            Some(&c) => Err(MuxError::EndedInsideFrame(c)),
            None => Ok(()),
        }
    }

    /// Whether the sender has ended `channel`.
    pub fn ended(&self, channel: Channel) -> bool {
        self.channels[channel.index()].ended
    }

    /// Bytes held in partial frames (allocated capacity), at most
    /// `CHANNELS * (LEN_PREFIX + max_frame)`.
    pub fn buffered(&self) -> usize {
        self.channels.iter().map(|r| r.frame.capacity()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;
    use crate::frame::CloseCode;
    use bytes::BufMut;
    use proptest::prelude::*;

    /// A frame of channel traffic with a valid prefix: `len` body bytes
    /// after it (type byte included), all `fill`.
    fn frame(len: usize, fill: u8) -> Bytes {
        let mut b = BytesMut::with_capacity(LEN_PREFIX + len);
        b.put_u32_le(len as u32);
        b.put_bytes(fill, len);
        b.freeze()
    }

    fn chunk(out: &mut Vec<u8>, channel: Channel, payload: &[u8]) {
        out.extend_from_slice(&chunk_header(channel, payload.len() as u16));
        out.extend_from_slice(payload);
    }

    /// Every event in `stream`, fed in pieces of `step` bytes.
    fn events(demux: &mut Demux, stream: &[u8], step: usize) -> Result<Vec<Event>, MuxError> {
        let mut out = vec![];
        for piece in stream.chunks(step.max(1)) {
            let mut input = piece;
            while let Some(e) = demux.feed(&mut input)? {
                out.push(e);
            }
            assert!(input.is_empty());
        }
        Ok(out)
    }

    fn limits(max_frame: usize) -> Limits {
        Limits {
            max_frame,
            ..Limits::default()
        }
    }

    #[test]
    fn channel_ids_round_trip() {
        for (i, c) in Channel::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
            assert_eq!(Channel::from_id(c.id()), Some(*c));
        }
        assert_eq!(Channel::Lane(Lane::Bulk).id(), 4);
        assert_eq!(Channel::from_id(5), None);
        assert_eq!(
            chunk_header(Channel::Lane(Lane::High), 0x1234),
            [2, 0x34, 0x12]
        );
    }

    #[test]
    fn a_control_frame_between_the_chunks_of_a_batch_comes_out_first() {
        let bulk = frame(40_000, 0xbb);
        let close = Frame::Close {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }
        .to_bytes();
        let mut s = vec![];
        let lane = Channel::Lane(Lane::Bulk);
        chunk(&mut s, lane, &bulk[..16_000]);
        chunk(&mut s, Channel::Control, &close);
        chunk(&mut s, lane, &bulk[16_000..]);
        chunk(&mut s, lane, &[]);
        for step in [1, 2, 3, 7, 100, 70_000] {
            let mut d = Demux::new(&Limits::default());
            let ev = events(&mut d, &s, step).unwrap();
            assert_eq!(
                ev,
                vec![
                    Event::Frame {
                        channel: Channel::Control,
                        frame: close.clone()
                    },
                    Event::Frame {
                        channel: lane,
                        frame: bulk.clone()
                    },
                    Event::End(lane),
                ],
                "fed {step} bytes at a time"
            );
            assert!(d.ended(lane));
            d.finish().unwrap();
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn many_frames_in_one_chunk_and_a_prefix_split_across_chunks() {
        let (a, b, c) = (frame(1, 1), frame(2, 2), frame(300, 3));
        let mut joined = vec![];
        joined.extend_from_slice(&a);
        joined.extend_from_slice(&b);
        joined.extend_from_slice(&c);
        let mut s = vec![];
        // a, b and the first two bytes of c's prefix; then the rest.
        chunk(&mut s, Channel::Control, &joined[..a.len() + b.len() + 2]);
        chunk(&mut s, Channel::Control, &joined[a.len() + b.len() + 2..]);
        let mut d = Demux::new(&Limits::default());
        let frames: Vec<Bytes> = events(&mut d, &s, 5)
            .unwrap()
            .into_iter()
            .map(|e| match e {
                Event::Frame { frame, .. } => frame,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(frames, vec![a, b, c]);
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        let lane = Channel::Lane(Lane::Normal);
        let cases: Vec<(Vec<u8>, MuxError)> = vec![
            (vec![9, 1, 0, 0], MuxError::UnknownChannel(9)),
            // A TLS ClientHello's first bytes, as if TLS were skipped.
            (vec![0x16, 0x03, 0x01, 0x02], MuxError::UnknownChannel(0x16)),
            (
                [&chunk_header(lane, 4)[..], &[0, 0, 0, 0]].concat(),
                MuxError::EmptyFrame(lane),
            ),
            (
                [&chunk_header(lane, 4)[..], &101u32.to_le_bytes()].concat(),
                MuxError::FrameTooLarge {
                    channel: lane,
                    len: 101,
                    limit: 100,
                },
            ),
            (
                [&chunk_header(lane, 0)[..], &chunk_header(lane, 0)].concat(),
                MuxError::AfterEnd(lane),
            ),
            (
                [&chunk_header(lane, 0)[..], &chunk_header(lane, 1), &[1]].concat(),
                MuxError::AfterEnd(lane),
            ),
            (
                [
                    &chunk_header(lane, 5)[..],
                    &frame(10, 0)[..5],
                    &chunk_header(lane, 0),
                ]
                .concat(),
                MuxError::EndInsideFrame(lane),
            ),
        ];
        for (stream, want) in cases {
            let mut d = Demux::new(&limits(100));
            assert_eq!(events(&mut d, &stream, 1), Err(want.clone()), "{stream:?}");
        }
        assert_eq!(
            MuxError::FrameTooLarge {
                channel: lane,
                len: 1,
                limit: 0
            }
            .close_code(),
            CloseCode::Oversize
        );
        assert_eq!(
            MuxError::UnknownChannel(9).close_code(),
            CloseCode::Malformed
        );
    }

    #[test]
    fn the_end_of_the_stream_is_checked() {
        let lane = Channel::Lane(Lane::High);
        let mut d = Demux::new(&Limits::default());
        events(&mut d, &chunk_header(lane, 10)[..2], 1).unwrap();
        assert_eq!(d.finish(), Err(MuxError::EndedInsideChunk));

        let mut d = Demux::new(&Limits::default());
        let mut s = vec![];
        chunk(&mut s, lane, &frame(10, 0)[..6]);
        events(&mut d, &s, 4).unwrap();
        assert_eq!(d.finish(), Err(MuxError::EndedInsideFrame(lane)));

        let mut d = Demux::new(&Limits::default());
        let mut s = vec![];
        chunk(&mut s, lane, &frame(10, 0)[..2]);
        events(&mut d, &s, 4).unwrap();
        assert_eq!(d.finish(), Err(MuxError::EndedInsideFrame(lane)));
        assert_eq!(
            d.buffered(),
            0,
            "nothing allocated before the prefix is whole"
        );
    }

    /// Frames per channel (each a valid prefix and random body).
    fn traffic() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
        let body = prop::collection::vec(any::<u8>(), 1..3000);
        let frames = prop::collection::vec(body, 0..6);
        prop::collection::vec(frames, CHANNELS)
    }

    proptest! {
        #[test]
        fn any_interleaving_of_any_chunking_reassembles_exactly(
            traffic in traffic(),
            cuts in prop::collection::vec(1usize..5000, 1..64),
            order in prop::collection::vec(0usize..CHANNELS, 0..400),
            step in 1usize..9000,
            end in prop::collection::vec(any::<bool>(), CHANNELS),
        ) {
            // Each channel's byte stream, cut into chunks of the sizes in
            // `cuts` (cycled).
            let mut pending: Vec<std::collections::VecDeque<Vec<u8>>> = vec![];
            for (ci, frames) in traffic.iter().enumerate() {
                let mut bytes = vec![];
                for body in frames {
                    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    bytes.extend_from_slice(body);
                }
                let mut chunks = std::collections::VecDeque::new();
                let mut at = 0;
                let mut k = ci;
                while at < bytes.len() {
                    let n = cuts[k % cuts.len()].min(bytes.len() - at).min(MAX_CHUNK);
                    chunks.push_back(bytes[at..at + n].to_vec());
                    at += n;
                    k += 1;
                }
                pending.push(chunks);
            }
            // Interleave: `order` says whose chunk goes next, then the rest
            // round robin; ended channels get their end marker last.
            let mut stream = vec![];
            let mut pick = order.into_iter().chain((0..).map(|i| i % CHANNELS));
            while pending.iter().any(|p| !p.is_empty()) {
                let ci = pick.next().unwrap();
                if let Some(c) = pending[ci].pop_front() {
                    chunk(&mut stream, Channel::ALL[ci], &c);
                }
            }
            for (ci, &e) in end.iter().enumerate() {
                if e {
                    chunk(&mut stream, Channel::ALL[ci], &[]);
                }
            }
            let mut d = Demux::new(&limits(3000));
            let mut got: Vec<Vec<Vec<u8>>> = vec![vec![]; CHANNELS];
            let mut ended = vec![false; CHANNELS];
            for ev in events(&mut d, &stream, step).unwrap() {
                match ev {
                    Event::Frame { channel, frame } => {
                        prop_assert!(!ended[channel.index()]);
                        got[channel.index()].push(frame[LEN_PREFIX..].to_vec());
                    }
                    Event::End(channel) => ended[channel.index()] = true,
                }
            }
            prop_assert_eq!(got, traffic);
            prop_assert_eq!(ended, end);
            prop_assert_eq!(d.finish(), Ok(()));
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic_nor_allocate_past_the_bound(
            bytes in prop::collection::vec(any::<u8>(), 0..20_000),
            step in 1usize..600,
            max_frame in 1usize..5000,
        ) {
            let mut d = Demux::new(&limits(max_frame));
            let bound = CHANNELS * (LEN_PREFIX + max_frame);
            'feed: for piece in bytes.chunks(step) {
                let mut input = piece;
                loop {
                    match d.feed(&mut input) {
                        Ok(Some(Event::Frame { frame, .. })) => {
                            prop_assert!(frame.len() <= LEN_PREFIX + max_frame);
                        }
                        Ok(Some(Event::End(_))) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                    prop_assert!(d.buffered() <= bound);
                }
                prop_assert!(d.buffered() <= bound);
            }
            let _ = d.finish();
        }

        #[test]
        fn a_huge_announced_frame_allocates_nothing_before_it_is_checked(
            len in 101u32..,
            channel in 0u8..5,
        ) {
            let mut s = chunk_header(Channel::ALL[usize::from(channel)], 4).to_vec();
            s.extend_from_slice(&len.to_le_bytes());
            let mut d = Demux::new(&limits(100));
            let mut input = &s[..];
            let err = d.feed(&mut input).unwrap_err();
            let is_too_large = matches!(err, MuxError::FrameTooLarge { .. });
            prop_assert!(is_too_large);
            prop_assert_eq!(d.buffered(), 0);
        }
    }
}
