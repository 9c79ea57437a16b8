//! The Celluler relay wire format: cell messages, identities and link frames.
//!
//! This crate is pure: it opens no sockets, reads no clock (time is passed in
//! as a value) and touches the filesystem only in [`keyfile`]. Every length and
//! count it decodes is bounded by [`Limits`]; decoding arbitrary bytes returns a
//! typed error and never panics or allocates past its bound.
//!
//! The byte-exact layout is in `docs/PROTOCOL.md` at the workspace root.
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use relay_codec::{Destination, Envelope, Keypair, Lane, Limits, Message};
//!
//! let alice = Keypair::from_secret_bytes(&[1; 32]);
//! let bob = Keypair::from_secret_bytes(&[2; 32]);
//! let msg = Message::new(alice.public(), Destination::Cell(bob.public()), Bytes::from_static(b"hi"))
//!     .with_lane(Lane::High)
//!     .with_timestamp(1_700_000_000_000)
//!     .with_nonce(7);
//! let mut buf = BytesMut::new();
//! msg.encode_signed(&alice, &mut buf);
//! let env = Envelope::parse(&mut buf.freeze(), &Limits::default()).unwrap();
//! env.verify().unwrap();
//! assert_eq!(env.payload(), &b"hi"[..]);
//! ```

pub mod batch;
pub mod error;
pub mod frame;
pub mod id_table;
pub mod key;
pub mod keyfile;
pub mod limits;
pub mod mesh;
pub mod message;
pub mod mux;
pub mod verify;
mod wire;

pub use batch::{BatchDecoder, BatchEncoder, BatchFrame};
pub use error::{DecodeError, KeyError, VerifyError};
pub use frame::{Frame, FrameType};
pub use key::{Keypair, NodeAddr, PublicKey};
pub use keyfile::KeyFileError;
pub use limits::Limits;
pub use mesh::{Location, MeshFrame, RouteHeader};
pub use message::{
    Authenticator, Destination, Envelope, Kind, Lane, Message, MessageId, Qos, ServiceName,
};
