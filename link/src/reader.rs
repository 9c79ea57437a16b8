//! Reading a link: [`FrameReceiver`], whole frames from one channel (the
//! control channel or a lane) over either transport, and [`BatchReader`],
//! the one reader of a lane's batches that both ends use (a relay's
//! ingress, a cell's receive path).
//!
//! Both hold at most one partial frame per channel, bounded by the link's
//! [`Limits::max_frame`]; a frame wholly inside what the transport returned
//! is sliced out without a copy.

use crate::error::LinkError;
use crate::quic::QuicReader;
use crate::tcp::TcpReceiver;
use relay_codec::batch::BatchFrame;
use relay_codec::frame::CloseCode;
use relay_codec::{BatchDecoder, Envelope, Frame, Lane, Limits};

/// Whole frames from one channel of a link, within the link's limits.
#[derive(Debug)]
pub enum FrameReceiver {
    /// A QUIC stream.
    Quic(QuicReader),
    /// A TCP mux channel.
    Tcp(TcpReceiver),
}

impl FrameReceiver {
    /// The next frame; `Ok(None)` once the peer ended the channel cleanly
    /// between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
        match self {
            FrameReceiver::Quic(r) => r.next().await,
            FrameReceiver::Tcp(r) => r.next().await,
        }
    }

    /// Stops reading: the peer is told to stop sending (QUIC), or what
    /// arrives is discarded (TCP cannot stop one channel of a connection).
    pub fn stop(&mut self, code: CloseCode) {
        match self {
            FrameReceiver::Quic(r) => r.stop(code),
            FrameReceiver::Tcp(r) => r.stop(),
        }
    }
}

/// The batches of one lane the peer sends, decoded: batch frames only,
/// every one of the same lane (a peer that breaks either rule gets a
/// [`LinkError`] whose [`peer_fault`](LinkError::peer_fault) is the code to
/// close with).
pub struct BatchReader {
    recv: FrameReceiver,
    decoder: BatchDecoder,
    lane: Option<Lane>,
}

impl std::fmt::Debug for BatchReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchReader")
            .field("recv", &self.recv)
            .field("lane", &self.lane)
            .finish_non_exhaustive()
    }
}

impl BatchReader {
    /// A reader of the lane `recv` (from [`crate::Link::accept_lane`]),
    /// decoding within `limits`. Fails only if no zstd context can be made.
    pub fn new(recv: FrameReceiver, limits: Limits) -> Result<Self, LinkError> {
        Ok(Self {
            recv,
            decoder: BatchDecoder::new(limits).map_err(LinkError::Zstd)?,
            lane: None,
        })
    }

    /// The lane this channel carries, once its first batch has come.
    pub fn lane(&self) -> Option<Lane> {
        self.lane
    }

    /// The next batch, with its messages decoded into `envs` (emptied
    /// first; reuse it across calls); `Ok(None)` once the peer ended the
    /// lane cleanly. On an error `envs` holds nothing of the bad batch.
    pub async fn next(
        &mut self,
        envs: &mut Vec<Envelope>,
    ) -> Result<Option<BatchFrame>, LinkError> {
        envs.clear();
        let batch = match self.recv.next().await? {
            Some(Frame::Batch(b)) => b,
            Some(other) => return Err(LinkError::NotBatch(other.name())),
            None => return Ok(None),
        };
        let first = *self.lane.get_or_insert(batch.lane);
        if first != batch.lane {
            return Err(LinkError::MixedLanes {
                first,
                got: batch.lane,
            });
        }
        let decoded = self.decoder.messages(&batch).and_then(|msgs| {
            for m in msgs {
                envs.push(m?);
            }
            Ok(())
        });
        if let Err(e) = decoded {
            envs.clear();
            return Err(e.into());
        }
        Ok(Some(batch))
    }

    /// Stops reading the lane (see [`FrameReceiver::stop`]).
    pub fn stop(&mut self, code: CloseCode) {
        self.recv.stop(code);
    }
}
