//! Framing: `u32 length` (big-endian, = 1 + payload bytes), `u8 message type`, payload.

use bytes::BytesMut;

use super::error_code::ErrorCode;
use super::message::{Message, MessageType};
use crate::frame::{self, Framing, LENGTH_BYTES};
use crate::session::ClosingError;

/// Bytes before the payload: the 4-byte length and the type byte.
pub const FRAME_HEADER_BYTES: usize = LENGTH_BYTES + IncubatorFraming::TAG_BYTES;

/// A frame that cannot be decoded. Every variant closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The length field exceeds the receiver's limit; detected from the header alone.
    #[error("frame length {length} exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The length field received.
        length: u32,
        /// The limit in force (frame_bytes_max).
        max: u32,
    },
    /// The length field is 0, so there is not even a type byte.
    #[error("frame length 0: a frame holds at least its message type byte")]
    EmptyFrame,
    /// The type byte names no message type of this protocol version.
    #[error("unknown message type {0}")]
    UnknownMessageType(u8),
    /// The payload is not a valid protobuf encoding of the type's message.
    #[error("malformed {message_type} payload: {detail}")]
    Malformed {
        /// The type named by the frame.
        message_type: MessageType,
        /// What the protobuf decoder reported.
        detail: String,
    },
}

impl ProtoError {
    /// The error code to send (with seq 0) before closing the connection.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ProtoError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtoError::EmptyFrame | ProtoError::Malformed { .. } => ErrorCode::MalformedFrame,
            ProtoError::UnknownMessageType(_) => ErrorCode::UnknownMessageType,
        }
    }
}

impl ClosingError for ProtoError {
    type Code = ErrorCode;

    fn error_code(&self) -> ErrorCode {
        ProtoError::error_code(self)
    }
}

/// The incubator's framing: the length field counts a message type byte, then the payload.
#[derive(Debug, Clone, Copy)]
pub struct IncubatorFraming;

impl Framing for IncubatorFraming {
    const TAG_BYTES: usize = 1;
    type Tag = MessageType;
    type Error = ProtoError;

    fn too_large(length: u32, frame_bytes_max: u32) -> ProtoError {
        ProtoError::FrameTooLarge {
            length,
            max: frame_bytes_max,
        }
    }

    fn check_header(length: u32, tag: &[u8]) -> Result<Option<MessageType>, ProtoError> {
        if length == 0 {
            return Err(ProtoError::EmptyFrame);
        }
        tag.first()
            .map(|&type_byte| MessageType::try_from(type_byte))
            .transpose()
    }
}

/// Incremental frame decoder for one connection's receive buffer: the shared
/// [`crate::frame::FrameDecoder`] over the incubator's framing, with its limit
/// (frame_bytes_max), [`FrameDecoder::bytes_wanted`] and the protocol's [`FrameDecoder::decode`].
pub type FrameDecoder = frame::FrameDecoder<IncubatorFraming>;

impl frame::FrameDecoder<IncubatorFraming> {
    /// Decodes the next frame of `src`.
    ///
    /// Returns `Ok(None)` and consumes nothing while the frame is incomplete; `Ok(Some(..))`
    /// after consuming exactly one frame (`bytes` fields are slices of `src`, not copies). Size
    /// and type errors are reported as soon as the 5-byte header is there, before the payload.
    /// Every error means the connection must be closed: header errors consume nothing, a
    /// malformed payload consumes its frame.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
        let Some((message_type, payload)) = self.next_frame(src)? else {
            return Ok(None);
        };
        Message::decode_payload(message_type, payload).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incubator::samples::{example, examples, EXAMPLE_JPEG};
    use crate::incubator::FRAME_BYTES_MAX_DEFAULT;
    use bytes::BufMut;

    fn decoder() -> FrameDecoder {
        FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT)
    }

    fn header(length: u32, type_byte: u8) -> BytesMut {
        let mut src = BytesMut::new();
        src.put_u32(length);
        src.put_u8(type_byte);
        src
    }

    #[test]
    fn every_message_type_round_trips() {
        for message in examples() {
            let mut src = BytesMut::from(&message.to_bytes()[..]);
            assert_eq!(src.len(), message.encoded_len());
            let decoded = decoder()
                .decode(&mut src)
                .expect("decodes")
                .expect("complete");
            assert_eq!(decoded, message, "{}", message.message_type());
            assert!(
                src.is_empty(),
                "{} left bytes behind",
                message.message_type()
            );
        }
    }

    #[test]
    fn frame_header_is_big_endian_length_then_type() {
        let frame = example(MessageType::Ping).to_bytes();
        // PING seq 7: payload is field 1 varint 7 = 08 07.
        assert_eq!(&frame[..], &[0, 0, 0, 3, 12, 0x08, 0x07]);
    }

    #[test]
    fn decodes_all_frames_fed_one_byte_at_a_time() {
        let mut stream = BytesMut::new();
        for message in examples() {
            message.encode(&mut stream);
        }
        let mut decoder = decoder();
        let mut src = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in stream {
            src.put_u8(byte);
            while let Some(message) = decoder.decode(&mut src).expect("valid stream") {
                decoded.push(message);
            }
        }
        assert_eq!(decoded, examples());
        assert!(src.is_empty());
    }

    #[test]
    fn truncated_frame_waits_without_consuming_then_completes() {
        let frame = example(MessageType::Image).to_bytes();
        let mut decoder = decoder();
        for cut in [0, 3, 4, 5, frame.len() - 1] {
            let mut src = BytesMut::from(&frame[..cut]);
            assert_eq!(decoder.decode(&mut src), Ok(None), "cut at {cut}");
            assert_eq!(src.len(), cut, "consumed bytes at cut {cut}");
            let wanted = if cut < LENGTH_BYTES {
                FRAME_HEADER_BYTES
            } else {
                frame.len()
            };
            assert_eq!(decoder.bytes_wanted(&src), wanted - cut, "cut at {cut}");
            src.extend_from_slice(&frame[cut..]);
            let message = decoder
                .decode(&mut src)
                .expect("decodes")
                .expect("complete");
            assert_eq!(message, example(MessageType::Image));
        }
    }

    #[test]
    fn image_bytes_are_a_slice_of_the_receive_buffer() {
        let frame = example(MessageType::Image).to_bytes();
        let mut src = BytesMut::from(&frame[..]);
        let buffer_range = src.as_ptr() as usize..src.as_ptr() as usize + src.len();
        let Some(Message::Image(image)) = decoder().decode(&mut src).expect("decodes") else {
            panic!("not an IMAGE");
        };
        assert_eq!(&image.jpeg[..], &EXAMPLE_JPEG);
        assert!(
            buffer_range.contains(&(image.jpeg.as_ptr() as usize)),
            "jpeg was copied"
        );
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut decoder = FrameDecoder::new(1024);
        let mut src = BytesMut::new();
        src.put_u32(1025);
        assert_eq!(
            decoder.decode(&mut src),
            Err(ProtoError::FrameTooLarge {
                length: 1025,
                max: 1024
            })
        );
        assert_eq!(src.len(), 4, "must not consume");
        let mut at_limit = header(1024, MessageType::Image.as_u8());
        assert_eq!(decoder.decode(&mut at_limit), Ok(None));
        decoder.set_frame_bytes_max(2048);
        let mut src = header(1025, MessageType::Image.as_u8());
        assert_eq!(decoder.decode(&mut src), Ok(None));
    }

    #[test]
    fn zero_length_is_an_empty_frame() {
        let mut src = BytesMut::from(&[0u8, 0, 0, 0][..]);
        let error = decoder().decode(&mut src).expect_err("empty frame");
        assert_eq!(error, ProtoError::EmptyFrame);
        assert_eq!(error.error_code(), ErrorCode::MalformedFrame);
    }

    #[test]
    fn unknown_type_is_refused_before_the_payload_arrives() {
        for type_byte in [0u8, 13, 255] {
            let mut src = header(1000, type_byte);
            let error = decoder().decode(&mut src).expect_err("unknown type");
            assert_eq!(error, ProtoError::UnknownMessageType(type_byte));
            assert_eq!(error.error_code(), ErrorCode::UnknownMessageType);
        }
    }

    #[test]
    fn garbage_payload_is_malformed() {
        // Field 1 with wire type 7 does not exist.
        let mut src = header(3, MessageType::Ping.as_u8());
        src.put_slice(&[0x0f, 0x01]);
        let error = decoder().decode(&mut src).expect_err("malformed");
        assert!(
            matches!(
                &error,
                ProtoError::Malformed {
                    message_type: MessageType::Ping,
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(error.error_code(), ErrorCode::MalformedFrame);
        // A length-delimited field running past the end of the payload.
        let mut src = header(3, MessageType::Image.as_u8());
        src.put_slice(&[0x12, 0x40]);
        assert!(matches!(
            decoder().decode(&mut src),
            Err(ProtoError::Malformed {
                message_type: MessageType::Image,
                ..
            })
        ));
    }

    #[test]
    fn message_type_conversions_agree() {
        for message_type in MessageType::ALL {
            assert_eq!(
                MessageType::try_from(message_type.as_u8()),
                Ok(message_type)
            );
            assert_eq!(
                MessageType::from_name(message_type.name()),
                Some(message_type)
            );
            assert_eq!(example(message_type).message_type(), message_type);
        }
        assert_eq!(
            MessageType::try_from(0),
            Err(ProtoError::UnknownMessageType(0))
        );
    }

    #[test]
    fn seq_is_zero_only_for_the_handshake() {
        for mut message in examples() {
            message.set_seq(42);
            let expected = match message.message_type() {
                MessageType::Hello | MessageType::HelloOk => 0,
                _ => 42,
            };
            assert_eq!(message.seq(), expected, "{}", message.message_type());
        }
    }
}
