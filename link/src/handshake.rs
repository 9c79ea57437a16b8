//! The Hello/Welcome handshake over any [`Link`], for either role (a cell
//! or a relay dialing a relay), and the close that tells the peer why.
//!
//! The connecting side opens the control channel and sends Hello
//! ([`hello`]); the accepting side reads it ([`accept_hello`]) and answers
//! with Welcome, or refuses with [`close`]. Both ways a refusal reaches the
//! connecting side as [`LinkError::Refused`] with the peer's code and
//! reason, over QUIC and TCP alike (docs/PROTOCOL.md, sections 5 and 6).

use crate::conn::{ControlSender, Link};
use crate::error::{LinkEnd, LinkError};
use crate::reader::FrameReceiver;
use relay_codec::frame::{CloseCode, PROTOCOL_VERSION, Role};
use relay_codec::{Frame, PublicKey};
use std::time::Duration;

/// How long [`close`] waits for its Close frame to be written, and (QUIC)
/// then for the peer to take it, before the transport close.
const CLOSE_WRITE: Duration = Duration::from_millis(500);
const CLOSE_TAKEN: Duration = Duration::from_millis(200);

/// What the accepting side said in its Welcome.
#[derive(Clone, Debug)]
pub struct Welcome {
    /// The protocol version in use.
    pub version: u16,
    /// The accepting node's key.
    pub node: PublicKey,
    /// Its clock, ms since the Unix epoch.
    pub time_ms: u64,
    /// Largest payload it accepts.
    pub max_payload: u32,
    /// Largest frame it accepts.
    pub max_frame: u32,
}

/// The Hello a connecting node sent.
#[derive(Clone, Debug)]
pub struct Hello {
    /// Highest version it speaks.
    pub version: u16,
    /// Cell or relay.
    pub role: Role,
    /// Whether it wants notices about its messages.
    pub notices: bool,
    /// Its software, for logs.
    pub agent: String,
}

/// The connecting side of the handshake: opens the control channel, sends
/// Hello and waits (at most `timeout`) for Welcome.
///
/// A refusal (a Close frame, or the link closed with a code) is
/// [`LinkError::Refused`] with the peer's code and reason. A Welcome of a
/// version this side does not speak closes the link with
/// [`CloseCode::Version`] and is [`LinkError::Version`].
pub async fn hello(
    link: &Link,
    role: Role,
    notices: bool,
    agent: &str,
    timeout: Duration,
) -> Result<(ControlSender, FrameReceiver, Welcome), LinkError> {
    let step = async {
        let (mut send, mut recv) = link.open_control().await?;
        send.send(&Frame::Hello {
            version: PROTOCOL_VERSION,
            role,
            notices,
            agent: agent.to_owned(),
        })
        .await?;
        match recv.next().await? {
            Some(Frame::Welcome {
                version,
                node,
                time_ms,
                max_payload,
                max_frame,
            }) => Ok((
                send,
                recv,
                Welcome {
                    version,
                    node,
                    time_ms,
                    max_payload,
                    max_frame,
                },
            )),
            Some(Frame::Close { code, reason }) => Err(LinkError::Refused { code, reason }),
            Some(other) => Err(LinkError::Unexpected {
                expected: "Welcome",
                got: other.name(),
            }),
            None => Err(LinkError::EndedBefore("Welcome")),
        }
    };
    let r = tokio::time::timeout(timeout, step).await;
    let refused = || match link.end() {
        Some(LinkEnd::Closed { code, reason }) => Some(LinkError::Refused { code, reason }),
        _ => None,
    };
    let (mut send, recv, welcome) = match r {
        Ok(Ok(v)) => v,
        Ok(Err(e @ LinkError::Refused { .. })) => return Err(e),
        Ok(Err(e)) => return Err(refused().unwrap_or(e)),
        Err(_) => return Err(refused().unwrap_or(LinkError::Timeout("Welcome"))),
    };
    if welcome.version == 0 || welcome.version > PROTOCOL_VERSION {
        let e = LinkError::Version {
            ours: PROTOCOL_VERSION,
            theirs: welcome.version,
        };
        close(link, Some(&mut send), CloseCode::Version, &e.to_string()).await;
        return Err(e);
    }
    Ok((send, recv, welcome))
}

/// The accepting side of the handshake: waits (at most `timeout`) for the
/// control channel and its Hello. The caller answers with Welcome, or
/// refuses with [`close`].
pub async fn accept_hello(
    link: &Link,
    timeout: Duration,
) -> Result<(ControlSender, FrameReceiver, Hello), LinkError> {
    let step = async {
        let (send, mut recv) = link.accept_control().await?;
        match recv.next().await? {
            Some(Frame::Hello {
                version,
                role,
                notices,
                agent,
            }) => Ok((
                send,
                recv,
                Hello {
                    version,
                    role,
                    notices,
                    agent,
                },
            )),
            Some(other) => Err(LinkError::Unexpected {
                expected: "Hello",
                got: other.name(),
            }),
            None => Err(LinkError::EndedBefore("Hello")),
        }
    };
    tokio::time::timeout(timeout, step)
        .await
        .map_err(|_| LinkError::Timeout("Hello"))?
}

/// Closes `link` with `code` and `reason` so the peer can print why, and
/// waits (about a second at most) for the close to leave.
///
/// QUIC: a Close frame on `control` first (best effort: the connection
/// close that follows discards unsent stream data), then the connection
/// close with the same code and reason. TCP: the link's own close, which
/// is a Close frame on the control channel and then `close_notify`.
pub async fn close(
    link: &Link,
    control: Option<&mut ControlSender>,
    code: CloseCode,
    reason: &str,
) {
    match link {
        Link::Quic(q) => {
            if let Some(ControlSender::Quic(s)) = control {
                let frame = Frame::Close {
                    code,
                    reason: reason.to_owned(),
                };
                let _ = tokio::time::timeout(CLOSE_WRITE, s.write_chunk(frame.to_bytes())).await;
                let _ = s.finish();
                // Give the Close frame a moment to reach the peer before the
                // connection close discards unsent stream data.
                let _ = tokio::time::timeout(CLOSE_TAKEN, s.stopped()).await;
            }
            q.close(code, reason);
        }
        Link::Tcp(t) => {
            t.close(code, reason);
            let _ = tokio::time::timeout(CLOSE_WRITE + CLOSE_TAKEN, t.close_sent()).await;
        }
    }
}
