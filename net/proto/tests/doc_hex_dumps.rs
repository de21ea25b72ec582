//! The example frames in `docs/protocol/incubator.md` are real: each decodes with the crate's
//! decoder as the type its "Frame: NAME" line says, is consumed whole, re-encodes to the same
//! bytes, and equals the crate's example message. All twelve types are shown.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::BytesMut;
use es_proto::incubator::samples::example;
use es_proto::incubator::{FrameDecoder, MessageType, FRAME_BYTES_MAX_DEFAULT};

const BYTES_PER_LINE: usize = 16;

/// One ```hex block and the type named on the line before it.
struct HexBlock {
    type_name: String,
    line_number: usize,
    lines: Vec<String>,
}

fn protocol_document() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol/incubator.md");
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn hex_blocks(document: &str) -> Vec<HexBlock> {
    let lines: Vec<&str> = document.lines().collect();
    let mut blocks = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        if line.trim_end() != "```hex" {
            continue;
        }
        let heading = lines[..index]
            .iter()
            .rev()
            .find(|line| !line.trim().is_empty());
        let type_name = heading
            .and_then(|line| line.trim().strip_prefix("Frame: "))
            .unwrap_or_else(|| panic!("line {}: no \"Frame: NAME\" line before ```hex", index + 1));
        let body = lines[index + 1..]
            .iter()
            .take_while(|line| line.trim_end() != "```");
        blocks.push(HexBlock {
            type_name: type_name.trim().to_owned(),
            line_number: index + 1,
            lines: body.map(|line| line.to_string()).collect(),
        });
    }
    blocks
}

/// Parses a block, checking the format: lowercase two-digit hex separated by single spaces,
/// 16 bytes per line (fewer only on the last line).
fn block_bytes(block: &HexBlock) -> Vec<u8> {
    let mut bytes = Vec::new();
    let last = block.lines.len().saturating_sub(1);
    for (index, line) in block.lines.iter().enumerate() {
        let tokens: Vec<&str> = line.split(' ').collect();
        let where_ = format!("block at line {}, row {}", block.line_number, index + 1);
        assert!(
            tokens.len() <= BYTES_PER_LINE,
            "{where_}: more than 16 bytes"
        );
        assert!(
            index == last || tokens.len() == BYTES_PER_LINE,
            "{where_}: short row"
        );
        for token in tokens {
            let valid = token.len() == 2
                && token
                    .bytes()
                    .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
            assert!(valid, "{where_}: {token:?} is not two lowercase hex digits");
            bytes.extend(hex::decode(token).expect("checked above"));
        }
    }
    bytes
}

fn check_block(block: &HexBlock) -> MessageType {
    let named = MessageType::from_name(&block.type_name).unwrap_or_else(|| {
        panic!(
            "line {}: unknown type {}",
            block.line_number, block.type_name
        )
    });
    let frame = block_bytes(block);
    let mut src = BytesMut::from(&frame[..]);
    let message = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT)
        .decode(&mut src)
        .unwrap_or_else(|error| panic!("{named}: {error}"))
        .unwrap_or_else(|| panic!("{named}: incomplete frame"));
    assert_eq!(
        message.message_type(),
        named,
        "frame type differs from its heading"
    );
    assert!(
        src.is_empty(),
        "{named}: {} bytes after the frame",
        src.len()
    );
    assert_eq!(
        &message.to_bytes()[..],
        &frame[..],
        "{named}: re-encoding differs"
    );
    assert_eq!(
        message,
        example(named),
        "{named}: differs from samples::example; regenerate"
    );
    named
}

#[test]
fn every_hex_dump_in_the_protocol_document_is_a_real_frame() {
    let blocks = hex_blocks(&protocol_document());
    let mut shown: BTreeMap<MessageType, usize> = BTreeMap::new();
    for block in &blocks {
        *shown.entry(check_block(block)).or_default() += 1;
    }
    for message_type in MessageType::ALL {
        assert_eq!(
            shown.get(&message_type),
            Some(&1),
            "{message_type} shown once"
        );
    }
    assert_eq!(blocks.len(), MessageType::ALL.len());
}

#[test]
fn the_block_parser_rejects_a_mislabelled_frame() {
    let document = "Frame: ACK\n\n```hex\n00 00 00 03 0c 08 07\n```\n";
    let blocks = hex_blocks(document);
    assert_eq!(blocks.len(), 1);
    let result = std::panic::catch_unwind(|| check_block(&blocks[0]));
    assert!(result.is_err(), "a PING frame labelled ACK must fail");
}
