//! Framing: `u32 length` (big-endian, = payload bytes), then the protobuf payload of one
//! envelope message.

use bytes::{BufMut, BytesMut};
use prost::Message;

use super::error_code::ErrorCode;
use super::pb;
use crate::frame::{self, Framing, LENGTH_BYTES};
use crate::session::ClosingError;

/// A frame that cannot be decoded. Every variant closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field exceeds the receiver's limit; detected from the length alone.
    #[error("frame length {length} exceeds the limit of {max} bytes")]
    TooLarge {
        /// The length field received.
        length: u32,
        /// The limit in force.
        max: u32,
    },
    /// The payload is not a valid protobuf encoding of the envelope.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    /// The error code to send (with seq 0) before closing the connection.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) => ErrorCode::MalformedFrame,
        }
    }
}

impl ClosingError for FrameError {
    type Code = ErrorCode;

    fn error_code(&self) -> ErrorCode {
        FrameError::error_code(self)
    }
}

/// The viewer's framing: the length field counts the payload alone; no tag.
#[derive(Debug, Clone, Copy)]
pub struct ViewerFraming;

impl Framing for ViewerFraming {
    const TAG_BYTES: usize = 0;
    type Tag = ();
    type Error = FrameError;

    fn too_large(length: u32, frame_bytes_max: u32) -> FrameError {
        FrameError::TooLarge {
            length,
            max: frame_bytes_max,
        }
    }

    fn check_header(_length: u32, _tag: &[u8]) -> Result<Option<()>, FrameError> {
        Ok(Some(()))
    }
}

/// Incremental decoder of one direction of a connection: the shared
/// [`crate::frame::FrameDecoder`] over the viewer's framing, with its limit (the login limit,
/// then request_bytes_max) and the protocol's [`FrameDecoder::decode`].
pub type FrameDecoder = frame::FrameDecoder<ViewerFraming>;

impl frame::FrameDecoder<ViewerFraming> {
    /// Decodes the next frame of `src` as an `M`.
    ///
    /// `Ok(None)` consumes nothing while the frame is incomplete. `Ok(Some(..))` consumed
    /// exactly one frame. A length over the limit is reported as soon as the 4 length bytes are
    /// there (nothing consumed); a malformed payload consumes its frame. Either error closes
    /// the connection.
    pub fn decode<M: Message + Default>(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<M>, FrameError> {
        let Some(((), payload)) = self.next_frame(src)? else {
            return Ok(None);
        };
        M::decode(payload)
            .map(Some)
            .map_err(|error| FrameError::Malformed(error.to_string()))
    }
}

/// Appends one frame holding `message` to `out`.
pub fn encode_frame<M: Message>(message: &M, out: &mut BytesMut) {
    let length = message.encoded_len();
    out.reserve(LENGTH_BYTES + length);
    out.put_u32(u32::try_from(length).expect("a frame is smaller than 4 GiB"));
    message
        .encode(out)
        .expect("BytesMut grows to hold the message");
}

/// Appends the frame of request `seq` to `out`: a `ClientMessage` envelope holding `request`,
/// as a viewer sends it.
pub fn encode_request(seq: u64, request: pb::client_message::Request, out: &mut BytesMut) {
    let message = pb::ClientMessage {
        seq,
        request: Some(request),
    };
    encode_frame(&message, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::viewer::pb;

    fn ping(seq: u64) -> pb::ClientMessage {
        pb::ClientMessage {
            seq,
            request: Some(pb::client_message::Request::Ping(pb::Ping {})),
        }
    }

    #[test]
    fn frames_round_trip_when_fed_one_byte_at_a_time() {
        let mut stream = BytesMut::new();
        for seq in 1..=3 {
            encode_frame(&ping(seq), &mut stream);
        }
        // seq 1, field 13 (ping) empty: 08 01 6a 00; length 4.
        assert_eq!(&stream[..8], &[0, 0, 0, 4, 0x08, 0x01, 0x6a, 0x00]);
        let mut decoder = FrameDecoder::new(1024);
        let mut src = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in stream {
            src.put_u8(byte);
            while let Some(message) = decoder.decode::<pb::ClientMessage>(&mut src).unwrap() {
                decoded.push(message);
            }
        }
        assert_eq!(decoded, vec![ping(1), ping(2), ping(3)]);
    }

    #[test]
    fn oversized_and_malformed_frames_are_typed_errors() {
        let mut decoder = FrameDecoder::new(16);
        let mut src = BytesMut::from(&[0u8, 0, 0, 17][..]);
        assert_eq!(
            decoder.decode::<pb::ClientMessage>(&mut src),
            Err(FrameError::TooLarge {
                length: 17,
                max: 16
            })
        );
        assert_eq!(src.len(), 4, "nothing consumed");
        let mut src = BytesMut::from(&[0u8, 0, 0, 2, 0xff, 0xff][..]);
        assert!(matches!(
            decoder.decode::<pb::ClientMessage>(&mut src),
            Err(FrameError::Malformed(_))
        ));
        let mut src = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(
            decoder.decode::<pb::ClientMessage>(&mut src),
            Ok(Some(pb::ClientMessage::default())),
            "an empty payload is an envelope with every field at its default"
        );
    }
}
