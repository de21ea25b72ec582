//! The example frames of `docs/protocol/viewer.md` section 12 decode to the messages the
//! document says, and those messages encode to exactly the bytes shown.

use bytes::BytesMut;
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use es_proto::viewer::{encode_frame, FrameDecoder};

/// The hex bytes of every ```text block of section 12, in order.
fn example_blocks() -> Vec<Vec<u8>> {
    let doc = include_str!("../../../docs/protocol/viewer.md");
    let section = doc
        .split("## 12 Example frames")
        .nth(1)
        .expect("section 12 exists");
    section
        .split("```text")
        .skip(1)
        .map(|block| {
            let block = block.split("```").next().unwrap();
            let mut bytes = Vec::new();
            for line in block.lines() {
                // Hex pairs come before the explanation on each line.
                for token in line.split_whitespace() {
                    if token.len() == 2 && token.chars().all(|c| c.is_ascii_hexdigit()) {
                        bytes.push(u8::from_str_radix(token, 16).unwrap());
                    } else {
                        break;
                    }
                }
            }
            bytes
        })
        .collect()
}

fn encoded<M: prost::Message>(message: &M) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_frame(message, &mut out);
    out.to_vec()
}

#[test]
fn every_example_frame_matches_its_message() {
    let blocks = example_blocks();
    assert_eq!(blocks.len(), 3, "three examples");
    let ping = pb::ClientMessage {
        seq: 7,
        request: Some(Request::Ping(pb::Ping {})),
    };
    let login = pb::ClientMessage {
        seq: 1,
        request: Some(Request::Login(pb::Login {
            protocol_version: 1,
            user: "anna".into(),
            password: "Embryo-2026!".into(),
            computer: "VIEWER-1".into(),
            ..Default::default()
        })),
    };
    let notice = pb::ServerMessage {
        seq: 0,
        body: Some(Body::Change(pb::ChangeNotice {
            change_seq: 42,
            entity: "embryo".into(),
            id: "E1".into(),
            version: 2,
            ..Default::default()
        })),
    };
    assert_eq!(blocks[0], encoded(&ping), "Ping example");
    assert_eq!(blocks[1], encoded(&login), "Login example");
    assert_eq!(blocks[2], encoded(&notice), "ChangeNotice example");
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut src = BytesMut::from(&blocks[1][..]);
    assert_eq!(
        decoder.decode::<pb::ClientMessage>(&mut src).unwrap(),
        Some(login)
    );
    let mut src = BytesMut::from(&blocks[2][..]);
    assert_eq!(
        decoder.decode::<pb::ServerMessage>(&mut src).unwrap(),
        Some(notice)
    );
}
