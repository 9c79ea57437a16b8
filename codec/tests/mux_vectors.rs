//! The test vector of the TCP chunk format (docs/PROTOCOL.md, section
//! 6.3.2): `codec/tests/vectors/mux_chunks.hex`, a Hello frame cut into two
//! chunks, a Close frame in one, and the end of the control channel.
//! Rebuilt here from the frames and compared byte for byte; with
//! `REGENERATE_VECTORS=1` the file is written instead.

use relay_codec::frame::{CloseCode, PROTOCOL_VERSION, Role};
use relay_codec::mux::{Channel, Demux, Event, chunk_header};
use relay_codec::{Frame, Limits};
use std::path::PathBuf;

fn hello() -> Frame {
    Frame::Hello {
        version: PROTOCOL_VERSION,
        role: Role::Cell,
        notices: true,
        agent: "relay-client/0.1.0".into(),
    }
}

fn close() -> Frame {
    Frame::Close {
        code: CloseCode::Unauthorized,
        reason: "key not allowed here".into(),
    }
}

fn build() -> Vec<u8> {
    let (hello, close) = (hello().to_bytes(), close().to_bytes());
    let mut s = vec![];
    for part in [&hello[..10], &hello[10..], &close[..]] {
        s.extend_from_slice(&chunk_header(Channel::Control, part.len() as u16));
        s.extend_from_slice(part);
    }
    s.extend_from_slice(&chunk_header(Channel::Control, 0));
    s
}

#[test]
fn the_chunk_vector_is_rebuilt_byte_for_byte_and_demultiplexes() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/mux_chunks.hex");
    let built = hex::encode(build()) + "\n";
    if std::env::var("REGENERATE_VECTORS").as_deref() == Ok("1") {
        std::fs::write(&path, &built).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{} cannot be read ({e}); create it with \
             `REGENERATE_VECTORS=1 cargo test -p relay-codec --test mux_vectors`",
            path.display()
        )
    });
    assert_eq!(committed, built);
    // The frames of PROTOCOL.md section 7.4, unchanged.
    let vectors = path.parent().unwrap();
    let text = |name: &str| std::fs::read_to_string(vectors.join(name)).unwrap();
    assert_eq!(
        hex::encode(hello().to_bytes()) + "\n",
        text("frame_hello.hex")
    );
    assert_eq!(
        hex::encode(close().to_bytes()) + "\n",
        text("frame_close.hex")
    );

    let bytes = hex::decode(committed.trim()).unwrap();
    assert_eq!(&bytes[..3], [0x00, 0x0a, 0x00]);
    let mut demux = Demux::new(&Limits::default());
    let mut input = &bytes[..];
    let mut events = vec![];
    while let Some(e) = demux.feed(&mut input).unwrap() {
        events.push(e);
    }
    demux.finish().unwrap();
    let frames: Vec<Frame> = events[..2]
        .iter()
        .map(|e| match e {
            Event::Frame {
                channel: Channel::Control,
                frame,
            } => Frame::decode(frame.clone(), &Limits::default()).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(frames, [hello(), close()]);
    assert_eq!(events[2], Event::End(Channel::Control));
    assert_eq!(events.len(), 3);
}
