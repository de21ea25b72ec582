//! The length-prefixed framing both protocols share: a `u32` big-endian length, then as many
//! bytes. What those bytes begin with (the incubator's message type byte, nothing for the
//! viewer) and how a protocol names its errors is said by a [`Framing`]; each protocol's
//! `FrameDecoder` is [`FrameDecoder`] over its own.

use std::marker::PhantomData;

use bytes::{Buf, Bytes, BytesMut};

/// Bytes of the length field.
pub const LENGTH_BYTES: usize = 4;

/// What a protocol's frames hold after the length field, before the payload, and its errors.
pub trait Framing {
    /// Bytes of the tag that follows the length field and is counted in it (the incubator's
    /// type byte: 1; the viewer has none: 0). A length field smaller than this is refused by
    /// [`Framing::check_header`].
    const TAG_BYTES: usize;
    /// What the tag says (the incubator's message type; `()` without a tag).
    type Tag;
    /// The protocol's decoding error; every one closes the connection.
    type Error;

    /// The error for a length field over the limit in force.
    fn too_large(length: u32, frame_bytes_max: u32) -> Self::Error;

    /// Checks a length field within the limit and the tag bytes received so far (fewer than
    /// [`Self::TAG_BYTES`] while they are arriving): an error as soon as the bytes present
    /// show one, `Ok(None)` while the tag is incomplete, the tag once it is whole.
    fn check_header(length: u32, tag: &[u8]) -> Result<Option<Self::Tag>, Self::Error>;
}

/// Incremental frame decoder of one direction of a connection, with the frame-length limit
/// `frame_bytes_max` (a bound on the length field, not counting the 4 length bytes).
///
/// Each protocol decodes its payloads with its own `decode` (see
/// `incubator::FrameDecoder::decode` and `viewer::FrameDecoder::decode`) on top of
/// [`Self::next_frame`].
pub struct FrameDecoder<F> {
    frame_bytes_max: u32,
    framing: PhantomData<fn() -> F>,
}

impl<F> std::fmt::Debug for FrameDecoder<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("frame_bytes_max", &self.frame_bytes_max)
            .finish()
    }
}

impl<F> Clone for FrameDecoder<F> {
    fn clone(&self) -> Self {
        FrameDecoder::new(self.frame_bytes_max)
    }
}

impl<F> FrameDecoder<F> {
    /// A decoder that refuses frames whose length field exceeds `frame_bytes_max`.
    pub fn new(frame_bytes_max: u32) -> Self {
        FrameDecoder {
            frame_bytes_max,
            framing: PhantomData,
        }
    }

    /// Changes the limit, e.g. once the server announced its own (HELLO_OK) or the viewer
    /// logged in (LoginOk).
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: u32) {
        self.frame_bytes_max = frame_bytes_max;
    }

    /// The limit in force.
    pub fn frame_bytes_max(&self) -> u32 {
        self.frame_bytes_max
    }
}

impl<F: Framing> FrameDecoder<F> {
    /// Takes the next whole frame off the front of `src`: its tag and its payload (a slice of
    /// `src`, not a copy).
    ///
    /// `Ok(None)` consumes nothing while the frame is incomplete. The length is checked as
    /// soon as its 4 bytes are there, the tag as soon as its bytes are, before the payload
    /// arrives; an error consumes nothing and closes the connection. `Ok(Some(..))` consumed
    /// exactly one frame.
    pub fn next_frame(&mut self, src: &mut BytesMut) -> Result<Option<(F::Tag, Bytes)>, F::Error> {
        if src.len() < LENGTH_BYTES {
            return Ok(None);
        }
        let length = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if length > self.frame_bytes_max {
            return Err(F::too_large(length, self.frame_bytes_max));
        }
        let tag_end = src.len().min(LENGTH_BYTES + F::TAG_BYTES);
        let Some(tag) = F::check_header(length, &src[LENGTH_BYTES..tag_end])? else {
            return Ok(None);
        };
        let frame_bytes = LENGTH_BYTES + length as usize;
        if src.len() < frame_bytes {
            return Ok(None);
        }
        let mut frame = src.split_to(frame_bytes);
        frame.advance(LENGTH_BYTES + F::TAG_BYTES);
        Ok(Some((tag, frame.freeze())))
    }

    /// Bytes still missing before the frame at the start of `src` is complete (at least the
    /// length field and the tag); 0 when a whole frame is there. Lets an event loop size its
    /// reads.
    pub fn bytes_wanted(&self, src: &[u8]) -> usize {
        if src.len() < LENGTH_BYTES {
            return LENGTH_BYTES + F::TAG_BYTES - src.len();
        }
        let length = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        (LENGTH_BYTES + length.max(F::TAG_BYTES)).saturating_sub(src.len())
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use crate::{incubator, viewer};

    /// A frame header announcing `length` bytes, followed by `tail`.
    fn frame(length: u32, tail: &[u8]) -> bytes::BytesMut {
        let mut src = bytes::BytesMut::new();
        src.put_u32(length);
        src.put_slice(tail);
        src
    }

    #[test]
    fn both_protocols_refuse_a_frame_over_the_bound_from_its_length_alone() {
        // The incubator's header with its type byte, the viewer's without: both refused from
        // the length, nothing consumed, with the errors and wire codes they always had.
        let mut incubator_src = frame(1025, &[incubator::MessageType::Ping.as_u8()]);
        let incubator_error = incubator::FrameDecoder::new(1024)
            .decode(&mut incubator_src)
            .expect_err("over the bound");
        assert_eq!(
            incubator_error,
            incubator::ProtoError::FrameTooLarge {
                length: 1025,
                max: 1024
            }
        );
        let mut viewer_src = frame(1025, &[]);
        let viewer_error = viewer::FrameDecoder::new(1024)
            .decode::<viewer::pb::ClientMessage>(&mut viewer_src)
            .expect_err("over the bound");
        assert_eq!(
            viewer_error,
            viewer::FrameError::TooLarge {
                length: 1025,
                max: 1024
            }
        );
        assert_eq!((incubator_src.len(), viewer_src.len()), (5, 4), "consumed");
        let text = "frame length 1025 exceeds the limit of 1024 bytes";
        let incubator_session = incubator::SessionError::from(incubator_error);
        assert_eq!(incubator_session.code, incubator::ErrorCode::FrameTooLarge);
        let viewer_session = viewer::SessionError::from(viewer_error);
        assert_eq!(viewer_session.code, viewer::ErrorCode::FrameTooLarge);
        assert_eq!(
            [incubator_session.message.as_str(), &viewer_session.message],
            [text, text]
        );
        assert_eq!(
            incubator_session.to_string(),
            format!("frame_too_large (2): {text}")
        );
        assert_eq!(
            viewer_session.to_string(),
            format!("frame_too_large: {text}")
        );
    }

    #[test]
    fn a_frame_at_the_bound_waits_for_its_payload() {
        let mut src = frame(1024, &[incubator::MessageType::Image.as_u8()]);
        let mut decoder = incubator::FrameDecoder::new(1024);
        assert_eq!(decoder.decode(&mut src), Ok(None));
        assert_eq!(decoder.bytes_wanted(&src), 1023);
        let mut src = frame(1024, &[]);
        let mut decoder = viewer::FrameDecoder::new(1024);
        assert_eq!(
            decoder.decode::<viewer::pb::ClientMessage>(&mut src),
            Ok(None)
        );
        assert_eq!(decoder.bytes_wanted(&src), 1024);
        assert_eq!(decoder.bytes_wanted(&[0, 0]), 2);
    }

    #[test]
    fn the_tag_is_counted_in_the_length_and_a_zero_length_differs_by_protocol() {
        // Incubator: a length of 0 has no room for the type byte (malformed_frame).
        let error = incubator::FrameDecoder::new(1024)
            .decode(&mut frame(0, &[]))
            .expect_err("empty frame");
        assert_eq!(error, incubator::ProtoError::EmptyFrame);
        assert_eq!(error.error_code(), incubator::ErrorCode::MalformedFrame);
        // Viewer: a length of 0 is an envelope with every field at its default.
        let decoded =
            viewer::FrameDecoder::new(1024).decode::<viewer::pb::ClientMessage>(&mut frame(0, &[]));
        assert_eq!(decoded, Ok(Some(viewer::pb::ClientMessage::default())));
    }
}
