//! Test vectors of the wire format (docs/PROTOCOL.md), committed under
//! `codec/tests/vectors/`: one lowercase hex string per file with a trailing
//! newline (`*.hex`), or one line of text (`*.txt`).
//!
//! Every vector is built from fixed inputs: the sender's ed25519 secret seed
//! is `[1; 32]`, the receiver's `[2; 32]`, and timestamps and nonces are
//! constants. Ed25519 signatures are deterministic, so even signed messages
//! are stable.
//!
//! The tests
//! - rebuild each vector with the public API and compare it byte for byte
//!   with the committed file (all but the zstd batch: zstd's output may change
//!   between library versions, so that file is only decoded);
//! - decode each committed file and check its fields, both through the codec
//!   and by reading fixed offsets by hand, and verify signatures and message
//!   ids with ed25519-dalek and xxhash directly, as another implementation
//!   would;
//! - with `REGENERATE_VECTORS=1`, write the files instead of comparing them.
//!   Without it a missing or different file fails the test.

use bytes::{Bytes, BytesMut};
use relay_codec::frame::{CloseCode, NoticeCode, PROTOCOL_VERSION, PresenceInfo, Role};
use relay_codec::keyfile::{read_keyfile, write_keyfile};
use relay_codec::verify::verify_batch;
use relay_codec::{
    Authenticator, BatchDecoder, BatchEncoder, Destination, Envelope, Frame, Keypair, Kind, Lane,
    Limits, Location, MeshFrame, Message, MessageId, NodeAddr, PublicKey, Qos, RouteHeader,
    ServiceName, VerifyError,
};
use std::path::PathBuf;

const REGEN_ENV: &str = "REGENERATE_VECTORS";
const SENDER_SEED: [u8; 32] = [1; 32];
const RECEIVER_SEED: [u8; 32] = [2; 32];
/// 2023-11-14T22:13:20Z in ms since the Unix epoch.
const T0: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------
// Reading, comparing and regenerating vector files

fn vector_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn regenerating() -> bool {
    std::env::var(REGEN_ENV).as_deref() == Ok("1")
}

/// The committed text of vector `name`, written from `built` first when
/// regenerating; a missing file fails with how to create it.
fn committed_text(name: &str, built: &str) -> String {
    let path = vector_dir().join(name);
    if regenerating() {
        std::fs::create_dir_all(vector_dir()).expect("create the vector directory");
        std::fs::write(&path, built).expect("write a vector file");
    }
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "test vector {} cannot be read ({e}); create the vectors with \
             `{REGEN_ENV}=1 cargo test -p relay-codec --test vectors`",
            path.display()
        )
    })
}

/// How a committed vector relates to what the encoder builds today.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Compare {
    /// The committed bytes must equal the encoder's, byte for byte.
    Exact,
    /// Only decoded (the zstd batch; its bytes depend on the zstd version).
    DecodeOnly,
}

/// The committed bytes of hex vector `name`, checked against `built`.
fn hex_vector(name: &str, built: &[u8], compare: Compare) -> Bytes {
    let text = committed_text(name, &format!("{}\n", hex::encode(built)));
    let Some(digits) = text.strip_suffix('\n') else {
        panic!("{name}: a vector file ends with one newline");
    };
    assert!(
        !digits.is_empty()
            && digits
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "{name}: a vector file is one lowercase hex string, no spaces, one trailing newline"
    );
    let bytes = hex::decode(digits).unwrap_or_else(|e| panic!("{name}: bad hex: {e}"));
    if compare == Compare::Exact {
        assert!(
            bytes == built,
            "{name}: the committed vector differs from what the encoder builds now\n\
             committed: {}\nencoder:   {}\n\
             If the wire format changed on purpose, regenerate with \
             `{REGEN_ENV}=1 cargo test -p relay-codec --test vectors` and update docs/PROTOCOL.md.",
            hex::encode(&bytes),
            hex::encode(built),
        );
    }
    Bytes::from(bytes)
}

/// The committed text vector `name`, which must equal `built`.
fn text_vector(name: &str, built: &str) -> String {
    let text = committed_text(name, built);
    assert_eq!(
        text, built,
        "{name}: the committed vector differs from what the code builds now; \
         regenerate with `{REGEN_ENV}=1 cargo test -p relay-codec --test vectors`"
    );
    text
}

// ---------------------------------------------------------------------------
// The fixed inputs

fn sender() -> Keypair {
    Keypair::from_secret_bytes(&SENDER_SEED)
}

fn receiver() -> Keypair {
    Keypair::from_secret_bytes(&RECEIVER_SEED)
}

fn service(name: &str) -> ServiceName {
    ServiceName::new(name).expect("a valid service name")
}

/// To one cell: high lane, durable, nonce whose bytes show the byte order.
fn msg_cell() -> Message {
    Message::new(
        sender().public(),
        Destination::Cell(receiver().public()),
        Bytes::from_static(b"hello, cell"),
    )
    .with_lane(Lane::High)
    .with_qos(Qos::Durable)
    .with_timestamp(T0 + 1)
    .with_nonce(0x0102_0304_0506_0708)
}

/// To everyone: normal lane, traced, TTL 8.
fn msg_broadcast() -> Message {
    let mut m = Message::new(
        sender().public(),
        Destination::Broadcast,
        Bytes::from_static(b"to everyone"),
    )
    .with_lane(Lane::Normal)
    .with_ttl(8)
    .with_timestamp(T0 + 2)
    .with_nonce(2);
    m.trace = true;
    m
}

/// To the cells that offer `chat/v1`: bulk lane.
fn msg_service() -> Message {
    Message::new(
        sender().public(),
        Destination::Service(service("chat/v1")),
        Bytes::from_static(b"who is there?"),
    )
    .with_lane(Lane::Bulk)
    .with_timestamp(T0 + 3)
    .with_nonce(3)
}

fn signed(mut m: Message, key: &Keypair) -> Message {
    m.sign(key);
    m
}

/// The receiver acknowledges the durable cell message: kind ack, control
/// lane, the payload is the acknowledged id.
fn msg_ack() -> Message {
    let id = signed(msg_cell(), &sender()).id();
    let mut m = Message::new(
        receiver().public(),
        Destination::Cell(sender().public()),
        Bytes::copy_from_slice(&id.0),
    )
    .with_lane(Lane::Control)
    .with_timestamp(T0 + 4)
    .with_nonce(4);
    m.kind = Kind::Ack;
    m
}

/// Layout only: the cell message with an AEAD tag authenticator whose 16
/// bytes are a placeholder (the end-to-end AEAD is not specified yet).
fn msg_cell_aead() -> Message {
    Message {
        auth: Authenticator::AeadTag([0xa5; 16]),
        ..msg_cell()
    }
}

fn batch_plain_messages() -> Vec<Message> {
    ["one", "two", "three"]
        .into_iter()
        .zip(0u64..)
        .map(|(p, i)| {
            Message::new(
                sender().public(),
                Destination::Cell(receiver().public()),
                Bytes::from_static(p.as_bytes()),
            )
            .with_timestamp(T0 + 10 + i)
            .with_nonce(10 + i)
        })
        .collect()
}

fn batch_zstd_messages() -> Vec<Message> {
    (0u64..40)
        .map(|i| {
            let payload = format!(
                "{{\"sensor\":\"t-{i:02}\",\"temp_c\":{}.{},\"status\":\"ok\"}}",
                18 + i % 7,
                i % 10
            );
            Message::new(
                sender().public(),
                Destination::Cell(receiver().public()),
                Bytes::from(payload),
            )
            .with_timestamp(T0 + 100 + i)
            .with_nonce(100 + i)
        })
        .collect()
}

fn encode(m: &Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    m.encode(&mut b);
    b.to_vec()
}

fn encode_signed(m: &Message, key: &Keypair) -> Vec<u8> {
    let mut b = BytesMut::new();
    m.encode_signed(key, &mut b);
    b.to_vec()
}

/// The batch frame of `msgs` signed by the sender, with the given encoder.
fn batch_frame(msgs: &[Message], level: i32, compress_min: usize) -> (Vec<u8>, bool) {
    let mut enc = BatchEncoder::new(level, compress_min).expect("zstd context");
    for m in msgs {
        enc.push_signed(m, &sender());
    }
    let mut out = BytesMut::new();
    let stats = enc.finish(Lane::Normal, &mut out);
    assert_eq!(stats.count, msgs.len());
    (out.to_vec(), stats.compressed)
}

// ---------------------------------------------------------------------------
// Independent checks: fixed offsets, as another implementation reads them

/// The fields of an encoded message read at the offsets of docs/PROTOCOL.md,
/// without the codec.
struct Raw<'a> {
    bytes: &'a [u8],
    dest_len: usize,
    payload_len: usize,
    auth_len: usize,
}

impl<'a> Raw<'a> {
    fn read(bytes: &'a [u8]) -> Self {
        assert!(bytes.len() >= 60, "a message has a 60-byte header");
        assert_eq!(bytes[1], 1, "version");
        let dest_len = bytes[7] as usize;
        let payload_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let auth_len = match bytes[5] {
            0 => 0,
            1 => 64,
            2 => 16,
            v => panic!("auth code {v}"),
        };
        assert_eq!(bytes.len(), 60 + dest_len + payload_len + auth_len);
        Self {
            bytes,
            dest_len,
            payload_len,
            auth_len,
        }
    }

    fn source(&self) -> [u8; 32] {
        self.bytes[12..44].try_into().unwrap()
    }

    fn timestamp(&self) -> u64 {
        u64::from_le_bytes(self.bytes[44..52].try_into().unwrap())
    }

    fn nonce(&self) -> u64 {
        u64::from_le_bytes(self.bytes[52..60].try_into().unwrap())
    }

    fn destination(&self) -> &[u8] {
        &self.bytes[60..60 + self.dest_len]
    }

    fn payload(&self) -> &[u8] {
        &self.bytes[60 + self.dest_len..60 + self.dest_len + self.payload_len]
    }

    /// Bytes `[1, 60+D+P)`: what the signature and the id cover.
    fn authenticated(&self) -> &[u8] {
        &self.bytes[1..self.bytes.len() - self.auth_len]
    }

    fn authenticator(&self) -> &[u8] {
        &self.bytes[self.bytes.len() - self.auth_len..]
    }

    /// Plain Ed25519 (RFC 8032) over the authenticated bytes, strict.
    fn verify_with_dalek(&self) {
        assert_eq!(self.auth_len, 64, "signed");
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&self.source()).expect("a valid key");
        let sig = ed25519_dalek::Signature::from_bytes(self.authenticator().try_into().unwrap());
        vk.verify_strict(self.authenticated(), &sig)
            .expect("signature verifies over bytes [1, 60+D+P)");
    }

    /// xxh3-128 (seed 0) of the authenticated bytes, as the 16 little-endian
    /// bytes of the u128.
    fn id_with_xxhash(&self) -> [u8; 16] {
        xxhash_rust::xxh3::xxh3_128(self.authenticated()).to_le_bytes()
    }
}

/// Checks a decoded message against the one it was built from, field by field.
fn assert_fields(name: &str, got: &Message, want: &Message) {
    assert_eq!(got.ttl, want.ttl, "{name}: ttl");
    assert_eq!(got.kind, want.kind, "{name}: kind");
    assert_eq!(got.qos, want.qos, "{name}: qos");
    assert_eq!(got.trace, want.trace, "{name}: trace");
    assert_eq!(got.lane, want.lane, "{name}: lane");
    assert_eq!(got.source, want.source, "{name}: source");
    assert_eq!(got.destination, want.destination, "{name}: destination");
    assert_eq!(got.timestamp_ms, want.timestamp_ms, "{name}: timestamp");
    assert_eq!(got.nonce, want.nonce, "{name}: nonce");
    assert_eq!(got.payload, want.payload, "{name}: payload");
    assert_eq!(got.auth, want.auth, "{name}: authenticator");
}

// ---------------------------------------------------------------------------
// Keys

#[test]
fn printable_keys() {
    let s = sender().public();
    let text = text_vector("key_sender.txt", &format!("{s}\n"));
    let printable = text.trim_end();
    assert_eq!(printable.len(), 52);
    assert!(
        printable
            .chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c))
    );
    assert_eq!(printable.parse::<PublicKey>().unwrap(), s);
    assert_eq!(printable.to_uppercase().parse::<PublicKey>().unwrap(), s);

    let r = receiver().public();
    let text = text_vector("key_receiver.txt", &format!("{r}\n"));
    assert_eq!(text.trim_end().parse::<PublicKey>().unwrap(), r);

    // The address forms of the documentation.
    let a: NodeAddr = format!("{s}@127.0.0.1:4433").parse().unwrap();
    assert_eq!((a.key, a.host.as_str(), a.port), (s, "127.0.0.1", 4433));
    let b: NodeAddr = format!("{s}@[::1]:4433").parse().unwrap();
    assert_eq!(
        (b.host.as_str(), b.to_string()),
        ("::1", format!("{s}@[::1]:4433"))
    );
}

#[test]
fn key_file() {
    let dir = tempfile::tempdir().unwrap();
    let written = dir.path().join("sender.key");
    write_keyfile(&written, &sender()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&written).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let built = std::fs::read_to_string(&written).unwrap();
    let text = text_vector("keyfile_sender.txt", &built);

    // The committed file, stored with mode 0600, reads back as the sender.
    let copy = dir.path().join("copy.key");
    std::fs::write(&copy, &text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let kp = read_keyfile(&copy).unwrap();
    assert_eq!(kp.public(), sender().public());
    assert_eq!(kp.secret_bytes(), SENDER_SEED);
}

// ---------------------------------------------------------------------------
// Messages

#[test]
fn unsigned_cell_message() {
    let m = msg_cell();
    let bytes = hex_vector("msg_cell_unsigned.hex", &encode(&m), Compare::Exact);
    let raw = Raw::read(&bytes);
    assert_eq!(bytes[0], 16, "default ttl");
    assert_eq!(
        &bytes[2..8],
        &[0, 0b01, 1, 0, 0, 32],
        "kind flags lane auth dkind dlen"
    );
    assert_eq!(raw.source(), sender().public().0);
    assert_eq!(raw.destination(), &receiver().public().0);
    assert_eq!(raw.timestamp(), T0 + 1);
    assert_eq!(
        &bytes[52..60],
        &[8, 7, 6, 5, 4, 3, 2, 1],
        "nonce, little-endian"
    );
    assert_eq!(raw.nonce(), 0x0102_0304_0506_0708);
    assert_eq!(raw.payload(), b"hello, cell");

    let env = Envelope::parse(&mut bytes.clone(), &Limits::default()).unwrap();
    assert_eq!(env.verify(), Err(VerifyError::Unsigned));
    assert_fields("msg_cell_unsigned", &env.to_message(), &m);
    assert_eq!(env.id().0, raw.id_with_xxhash());
}

#[test]
fn signed_cell_message_and_its_id() {
    let want = signed(msg_cell(), &sender());
    let bytes = hex_vector(
        "msg_cell_signed.hex",
        &encode_signed(&msg_cell(), &sender()),
        Compare::Exact,
    );
    assert_eq!(
        encode(&want),
        bytes,
        "sign() then encode() = encode_signed()"
    );
    let raw = Raw::read(&bytes);
    assert_eq!(bytes[5], 1, "auth: ed25519 signature");
    raw.verify_with_dalek();

    let env = Envelope::parse(&mut bytes.clone(), &Limits::default()).unwrap();
    env.verify().unwrap();
    assert_fields("msg_cell_signed", &env.to_message(), &want);

    let id = hex_vector("msg_id_cell_signed.hex", &want.id().0, Compare::Exact);
    assert_eq!(id.len(), 16);
    assert_eq!(&id[..], &raw.id_with_xxhash());
    assert_eq!(env.id(), MessageId(raw.id_with_xxhash()));

    // TTL is outside the authenticated bytes: a relay rewrites it in place.
    let mut hop = bytes.to_vec();
    hop[0] = 3;
    let env = Envelope::parse(&mut Bytes::from(hop), &Limits::default()).unwrap();
    assert_eq!(env.ttl(), 3);
    env.verify().unwrap();
    assert_eq!(&env.id().0[..], &id[..]);

    // Any authenticated byte changed breaks the signature.
    let mut bad = bytes.to_vec();
    bad[60 + 32] ^= 1;
    let env = Envelope::parse(&mut Bytes::from(bad), &Limits::default()).unwrap();
    assert_eq!(env.verify(), Err(VerifyError::BadSignature));
}

#[test]
fn signed_broadcast_service_and_ack_messages() {
    let cases = [
        ("msg_broadcast_signed.hex", msg_broadcast(), sender()),
        ("msg_service_signed.hex", msg_service(), sender()),
        ("msg_ack_signed.hex", msg_ack(), receiver()),
    ];
    for (name, m, key) in cases {
        let bytes = hex_vector(name, &encode_signed(&m, &key), Compare::Exact);
        let raw = Raw::read(&bytes);
        raw.verify_with_dalek();
        let env = Envelope::parse(&mut bytes.clone(), &Limits::default()).unwrap();
        env.verify().unwrap();
        assert_fields(name, &env.to_message(), &signed(m, &key));
        assert_eq!(env.id().0, raw.id_with_xxhash());
    }

    let b = hex_vector(
        "msg_broadcast_signed.hex",
        &encode_signed(&msg_broadcast(), &sender()),
        Compare::Exact,
    );
    assert_eq!(
        &b[..8],
        &[8, 1, 0, 0b10, 2, 1, 1, 0],
        "ttl 8, traced, broadcast"
    );

    let s = hex_vector(
        "msg_service_signed.hex",
        &encode_signed(&msg_service(), &sender()),
        Compare::Exact,
    );
    assert_eq!(
        &s[..8],
        &[16, 1, 0, 0, 3, 1, 2, 7],
        "bulk lane, service of 7 bytes"
    );
    assert_eq!(Raw::read(&s).destination(), b"chat/v1");

    let a = hex_vector(
        "msg_ack_signed.hex",
        &encode_signed(&msg_ack(), &receiver()),
        Compare::Exact,
    );
    assert_eq!(
        &a[..8],
        &[16, 1, 1, 0, 0, 1, 0, 32],
        "ack on the control lane"
    );
    let acked = signed(msg_cell(), &sender()).id();
    assert_eq!(Raw::read(&a).payload(), &acked.0);
}

#[test]
fn aead_tag_layout() {
    let m = msg_cell_aead();
    let bytes = hex_vector("msg_cell_aead_layout.hex", &encode(&m), Compare::Exact);
    let raw = Raw::read(&bytes);
    assert_eq!(bytes[5], 2, "auth: AEAD tag");
    assert_eq!(raw.authenticator(), &[0xa5; 16]);
    let env = Envelope::parse(&mut bytes.clone(), &Limits::default()).unwrap();
    assert_eq!(env.verify(), Err(VerifyError::Sealed));
    assert_fields("msg_cell_aead_layout", &env.to_message(), &m);
    // The auth code is authenticated, so the id differs from the signed one.
    assert_ne!(env.id(), signed(msg_cell(), &sender()).id());
}

// ---------------------------------------------------------------------------
// Control frames

fn control_frames() -> Vec<(&'static str, Frame)> {
    let cell_id = signed(msg_cell(), &sender()).id();
    vec![
        (
            "frame_hello.hex",
            Frame::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Cell,
                notices: true,
                agent: "relay-client/0.1.0".into(),
            },
        ),
        (
            "frame_welcome.hex",
            Frame::Welcome {
                version: PROTOCOL_VERSION,
                node: receiver().public(),
                time_ms: T0 + 500,
                max_payload: 1 << 20,
                max_frame: 4 << 20,
            },
        ),
        (
            "frame_close.hex",
            Frame::Close {
                code: CloseCode::Unauthorized,
                reason: "key not allowed here".into(),
            },
        ),
        (
            "frame_announce.hex",
            Frame::Announce {
                app_version: "1.2.3".into(),
                services: vec![service("chat/v1"), service("files")],
            },
        ),
        (
            "frame_discover.hex",
            Frame::Discover {
                request: 7,
                service: service("chat/v1"),
            },
        ),
        (
            "frame_discover_reply.hex",
            Frame::DiscoverReply {
                request: 7,
                cells: vec![(sender().public(), "1.2.3".into())],
            },
        ),
        ("frame_watch_presence.hex", Frame::WatchPresence(true)),
        (
            "frame_presence.hex",
            Frame::Presence {
                up: true,
                info: PresenceInfo {
                    key: sender().public(),
                    app_version: "1.2.3".into(),
                    services: vec![service("chat/v1")],
                },
            },
        ),
        (
            "frame_notice.hex",
            Frame::Notice {
                code: NoticeCode::UnknownDestination,
                count: 3,
                id: cell_id,
                subject: receiver().public(),
            },
        ),
        ("frame_ping.hex", Frame::Mesh(MeshFrame::Ping { nonce: 7 })),
        ("frame_pong.hex", Frame::Mesh(MeshFrame::Pong { nonce: 7 })),
        (
            "frame_link_state.hex",
            Frame::Mesh(MeshFrame::LinkState {
                origin: sender().public(),
                seq: 3,
                addr: "10.0.0.1:4433".into(),
                neighbors: vec![receiver().public()],
            }),
        ),
        (
            "frame_credit.hex",
            Frame::Mesh(MeshFrame::Credit {
                lane: Lane::Bulk,
                grant: 4096,
            }),
        ),
        (
            "frame_route.hex",
            Frame::Mesh(MeshFrame::Route {
                header: mesh_header(),
                up: true,
                cell: cell_key(),
                at: Location {
                    home: sender().public(),
                    version: T0,
                },
            }),
        ),
        (
            "frame_lookup.hex",
            Frame::Mesh(MeshFrame::Lookup {
                header: mesh_header(),
                request: 9,
                cell: cell_key(),
            }),
        ),
        (
            "frame_lookup_reply.hex",
            Frame::Mesh(MeshFrame::LookupReply {
                header: RouteHeader {
                    origin: receiver().public(),
                    target: sender().public(),
                    hops: 16,
                },
                request: 9,
                cell: cell_key(),
                at: Some(Location {
                    home: sender().public(),
                    version: T0,
                }),
            }),
        ),
        (
            "frame_trace.hex",
            Frame::Mesh(MeshFrame::Trace {
                header: mesh_header(),
                id: cell_id,
                source: cell_key(),
                ttl: 15,
                in_relay_us: 250,
                next: receiver().public(),
            }),
        ),
    ]
}

/// The routing header of the mesh vectors: from the sender's key (as a
/// relay) to the receiver's, 16 hops.
fn mesh_header() -> RouteHeader {
    RouteHeader {
        origin: sender().public(),
        target: receiver().public(),
        hops: 16,
    }
}

/// The cell the mesh vectors are about: 32 bytes of 0x0c.
fn cell_key() -> PublicKey {
    PublicKey([0x0c; 32])
}

#[test]
fn mesh_frames_match_the_documented_offsets() {
    let frames = control_frames();
    let get = |name: &str| {
        let (_, f) = frames.iter().find(|(n, _)| *n == name).unwrap();
        hex_vector(name, &f.to_bytes(), Compare::Exact)
    };
    let ping = get("frame_ping.hex");
    assert_eq!(&ping[..], &[9, 0, 0, 0, 0x0b, 7, 0, 0, 0, 0, 0, 0, 0]);
    let ls = get("frame_link_state.hex");
    assert_eq!(ls[4], 0x0d);
    assert_eq!(&ls[5..37], &sender().public().0);
    assert_eq!(u64::from_le_bytes(ls[37..45].try_into().unwrap()), 3);
    assert_eq!(ls[45] as usize, "10.0.0.1:4433".len());
    assert_eq!(&ls[46..59], b"10.0.0.1:4433");
    assert_eq!(&ls[59..61], &[1, 0], "one neighbour");
    assert_eq!(&ls[61..93], &receiver().public().0);
    assert_eq!(ls.len(), 93);
    let credit = get("frame_credit.hex");
    assert_eq!(&credit[..], &[6, 0, 0, 0, 0x0e, 3, 0, 0x10, 0, 0]);
    let route = get("frame_route.hex");
    assert_eq!(route.len(), 4 + 1 + 65 + 1 + 32 + 40);
    assert_eq!(route[4], 0x0f);
    assert_eq!(&route[5..37], &sender().public().0, "origin");
    assert_eq!(&route[37..69], &receiver().public().0, "target");
    assert_eq!(route[69], 16, "hops");
    assert_eq!(route[70], 1, "up");
    assert_eq!(&route[71..103], &cell_key().0);
    assert_eq!(&route[103..135], &sender().public().0, "home");
    assert_eq!(u64::from_le_bytes(route[135..143].try_into().unwrap()), T0);
    let lookup = get("frame_lookup.hex");
    assert_eq!(lookup.len(), 4 + 1 + 65 + 4 + 32);
    assert_eq!((lookup[4], lookup[70]), (0x10, 9));
    let reply = get("frame_lookup_reply.hex");
    assert_eq!(reply.len(), 4 + 1 + 65 + 4 + 32 + 1 + 40);
    assert_eq!((reply[4], reply[70], reply[106]), (0x11, 9, 1));
    let trace = get("frame_trace.hex");
    assert_eq!(trace.len(), 4 + 1 + 65 + 16 + 32 + 1 + 4 + 32);
    assert_eq!(trace[4], 0x12);
    assert_eq!(&trace[70..86], &signed(msg_cell(), &sender()).id().0);
    assert_eq!(trace[118], 15, "ttl");
    assert_eq!(u32::from_le_bytes(trace[119..123].try_into().unwrap()), 250);
}

#[test]
fn control_frames_match_and_decode() {
    let limits = Limits::default();
    for (name, frame) in control_frames() {
        let bytes = hex_vector(name, &frame.to_bytes(), Compare::Exact);
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(
            len,
            bytes.len() - 4,
            "{name}: length prefix counts type + body"
        );
        assert_eq!(
            Frame::decode(bytes.clone(), &limits).unwrap(),
            frame,
            "{name}"
        );
        // A decoder fed the frame with one byte missing waits for more.
        let mut short = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert_eq!(Frame::take(&mut short, &limits).unwrap(), None, "{name}");
    }

    // Spot checks of the bytes, as documented.
    let hello = hex_vector(
        "frame_hello.hex",
        &control_frames()[0].1.to_bytes(),
        Compare::Exact,
    );
    assert_eq!(
        &hello[4..9],
        &[0x02, 1, 0, 0, 1],
        "type, version 1, role cell, notices"
    );
    assert_eq!(hello[9] as usize, "relay-client/0.1.0".len());
    let welcome = hex_vector(
        "frame_welcome.hex",
        &control_frames()[1].1.to_bytes(),
        Compare::Exact,
    );
    assert_eq!(welcome.len(), 4 + 1 + 50);
    assert_eq!(&welcome[7..39], &receiver().public().0);
    let close = hex_vector(
        "frame_close.hex",
        &control_frames()[2].1.to_bytes(),
        Compare::Exact,
    );
    assert_eq!(&close[4..7], &[0x04, 2, 0], "type, code unauthorized");
    let notice = hex_vector(
        "frame_notice.hex",
        &control_frames()[8].1.to_bytes(),
        Compare::Exact,
    );
    assert_eq!(notice.len(), 4 + 1 + 54);
    assert_eq!(
        &notice[4..11],
        &[0x0a, 1, 0, 3, 0, 0, 0],
        "type, code unknown destination, count 3"
    );
    assert_eq!(&notice[11..27], &signed(msg_cell(), &sender()).id().0);
    assert_eq!(&notice[27..59], &receiver().public().0);
}

// ---------------------------------------------------------------------------
// Batches

#[test]
fn plain_batch() {
    let msgs = batch_plain_messages();
    let (built, compressed) = batch_frame(&msgs, 1, usize::MAX);
    assert!(!compressed);
    let bytes = hex_vector("batch_plain.hex", &built, Compare::Exact);

    // By hand: prefix, type, lane, flags, count, raw_len, then the messages.
    let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len() - 4);
    assert_eq!(
        &bytes[4..8],
        &[0x01, 2, 0, 3],
        "batch, normal lane, plain, count 3 (low byte)"
    );
    assert_eq!(bytes[8], 0, "count high byte");
    let raw_len = u32::from_le_bytes(bytes[9..13].try_into().unwrap()) as usize;
    assert_eq!(raw_len, bytes.len() - 13);
    let mut off = 13;
    for m in &msgs {
        let one = encode_signed(m, &sender());
        assert_eq!(&bytes[off..off + one.len()], &one[..]);
        Raw::read(&bytes[off..off + one.len()]).verify_with_dalek();
        off += one.len();
    }
    assert_eq!(off, bytes.len());

    check_batch("batch_plain.hex", bytes, &msgs, false);
}

#[test]
fn batch_forwarded_whole_with_a_hop_count() {
    // `batch_plain.hex` as it leaves a second relay that forwarded it
    // whole: the same data, flag 0x02 and a hops byte of 2 after raw_len.
    let msgs = batch_plain_messages();
    let (plain, _) = batch_frame(&msgs, 1, usize::MAX);
    let Frame::Batch(mut batch) =
        Frame::decode(Bytes::from(plain.clone()), &Limits::default()).unwrap()
    else {
        panic!("not a batch");
    };
    batch.hops = 2;
    let built = Frame::Batch(batch).to_bytes();
    let bytes = hex_vector("batch_hops.hex", &built, Compare::Exact);

    // By hand: one byte longer than the plain batch, flags 0x02, the hops
    // byte at offset 13, then the plain batch's data unchanged.
    let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len() - 4);
    assert_eq!(bytes.len(), plain.len() + 1);
    assert_eq!(
        &bytes[4..7],
        &[0x01, 2, 0x02],
        "batch, normal lane, hops flag"
    );
    assert_eq!(&bytes[7..13], &plain[7..13], "count and raw_len unchanged");
    assert_eq!(bytes[13], 2, "hops");
    assert_eq!(&bytes[14..], &plain[13..], "data unchanged");
    assert_eq!(bytes[14], 16, "the first message's TTL byte is still 16");

    // Decoded, every message has TTL 16 - 2 and still verifies.
    let want: Vec<Message> = msgs.into_iter().map(|m| m.with_ttl(14)).collect();
    check_batch("batch_hops.hex", bytes.clone(), &want, false);

    // A decoder refuses hops above a message's TTL byte, and a hops flag
    // with a hops byte of 0.
    let limits = Limits::default();
    let mut over = bytes.to_vec();
    over[13] = 17;
    let Frame::Batch(b) = Frame::decode(Bytes::from(over), &limits).unwrap() else {
        panic!("not a batch");
    };
    let first = BatchDecoder::new(limits)
        .unwrap()
        .messages(&b)
        .unwrap()
        .next();
    assert!(
        matches!(first, Some(Err(relay_codec::DecodeError::Invalid { .. }))),
        "{first:?}"
    );
    let mut zero = bytes.to_vec();
    zero[13] = 0;
    assert!(Frame::decode(Bytes::from(zero), &limits).is_err());
}

#[test]
fn zstd_batch() {
    let msgs = batch_zstd_messages();
    let (built, compressed) = batch_frame(&msgs, 1, 1024);
    assert!(compressed, "40 similar messages gain from compression");
    // zstd's bytes may differ between library versions: decode only.
    let bytes = hex_vector("batch_zstd.hex", &built, Compare::DecodeOnly);

    assert_eq!(bytes[4], 0x01, "batch frame");
    assert_eq!(&bytes[5..7], &[2, 1], "normal lane, zstd flag");
    assert_eq!(u16::from_le_bytes([bytes[7], bytes[8]]), 40);
    let raw_len = u32::from_le_bytes(bytes[9..13].try_into().unwrap()) as usize;
    // Independently of the codec: one zstd frame whose header states
    // raw_len, expanding to the messages back to back.
    let data = &bytes[13..];
    assert_eq!(&data[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    assert_eq!(
        zstd::zstd_safe::get_frame_content_size(data).unwrap(),
        Some(raw_len as u64)
    );
    let expanded = zstd::stream::decode_all(data).unwrap();
    let concat: Vec<u8> = msgs
        .iter()
        .flat_map(|m| encode_signed(m, &sender()))
        .collect();
    assert_eq!(expanded, concat);
    assert_eq!(raw_len, concat.len());

    check_batch("batch_zstd.hex", bytes, &msgs, true);

    // Today's encoder output decodes to the same messages too.
    check_batch("batch_zstd (re-encoded)", Bytes::from(built), &msgs, true);
}

/// Decodes a batch frame with the codec and checks every message.
fn check_batch(name: &str, bytes: Bytes, want: &[Message], compressed: bool) {
    let limits = Limits::default();
    let Frame::Batch(batch) = Frame::decode(bytes, &limits).unwrap() else {
        panic!("{name}: not a batch frame");
    };
    assert_eq!(batch.lane, Lane::Normal, "{name}");
    assert_eq!(batch.compressed, compressed, "{name}");
    assert_eq!(batch.count as usize, want.len(), "{name}");
    let mut dec = BatchDecoder::new(limits).unwrap();
    let envs: Vec<Envelope> = dec
        .messages(&batch)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(envs.len(), want.len(), "{name}");
    for (env, m) in envs.iter().zip(want) {
        env.verify().unwrap();
        assert_fields(name, &env.to_message(), &signed(m.clone(), &sender()));
    }
    verify_batch(&envs.iter().collect::<Vec<_>>()).unwrap();
}
