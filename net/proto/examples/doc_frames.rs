//! Prints the example frame of every incubator message type in the format of
//! `docs/protocol/incubator.md` ("Frame: NAME" and a fenced `hex` block).
//! Run: `cargo run -p es-proto --example doc_frames`.

use es_proto::incubator::samples::{examples, hex_dump};

fn main() {
    for message in examples() {
        let frame = message.to_bytes();
        println!("Frame: {}\n", message.message_type());
        println!("```hex\n{}```\n", hex_dump(&frame));
    }
}
