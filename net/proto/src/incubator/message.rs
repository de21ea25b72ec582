//! The twelve message types and their frame encoding.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;

use super::codec::{ProtoError, FRAME_HEADER_BYTES};
use super::pb;
use crate::wire_enum::wire_enum;

wire_enum! {
    /// The message type byte of a frame.
    pub enum MessageType: u8 {
        /// C->S: opens the session.
        Hello = 1 => "HELLO",
        /// S->C: accepts the session.
        HelloOk = 2 => "HELLO_OK",
        /// C->S: registers a dish.
        RegisterDish = 3 => "REGISTER_DISH",
        /// C->S: one image.
        Image = 4 => "IMAGE",
        /// C->S: telemetry samples and alarms.
        Telemetry = 5 => "TELEMETRY",
        /// C->S: asks what is stored for a dish.
        SyncState = 6 => "SYNC_STATE",
        /// S->C: answer to SYNC_STATE.
        SyncStateResult = 7 => "SYNC_STATE_RESULT",
        /// C->S: asks for a page of patients.
        ListPatients = 8 => "LIST_PATIENTS",
        /// S->C: answer to LIST_PATIENTS.
        PatientList = 9 => "PATIENT_LIST",
        /// S->C: success of a request.
        Ack = 10 => "ACK",
        /// S->C: failure of a request, or of the connection (seq 0).
        Error = 11 => "ERROR",
        /// C->S: keep-alive, answered by ACK.
        Ping = 12 => "PING",
    }

    /// Every message type, in type-number order.
    pub const ALL;
    /// The type byte on the wire.
    pub fn as_u8;
    /// The type with this type byte, if any (see also `TryFrom<u8>`, which names the error).
    pub fn from_u8;
    /// The name used in the protocol document, e.g. `"REGISTER_DISH"`.
    pub fn name;
    /// The type with this document name (`"HELLO_OK"`), if any.
    pub fn from_name;
}

impl MessageType {
    /// True for the types an incubator sends (HELLO and the requests).
    pub fn is_client_to_server(self) -> bool {
        matches!(
            self,
            MessageType::Hello
                | MessageType::RegisterDish
                | MessageType::Image
                | MessageType::Telemetry
                | MessageType::SyncState
                | MessageType::ListPatients
                | MessageType::Ping
        )
    }

    /// True for the client requests that carry a seq and get exactly one response.
    pub fn is_request(self) -> bool {
        self.is_client_to_server() && self != MessageType::Hello
    }

    /// True when `response` is a valid answer type to a request of this type.
    /// ERROR answers any request.
    pub fn accepts_response(self, response: MessageType) -> bool {
        match response {
            MessageType::Error => self.is_request(),
            MessageType::Ack => matches!(
                self,
                MessageType::RegisterDish
                    | MessageType::Image
                    | MessageType::Telemetry
                    | MessageType::Ping
            ),
            MessageType::SyncStateResult => self == MessageType::SyncState,
            MessageType::PatientList => self == MessageType::ListPatients,
            _ => false,
        }
    }
}

impl TryFrom<u8> for MessageType {
    type Error = ProtoError;

    fn try_from(value: u8) -> Result<Self, ProtoError> {
        MessageType::from_u8(value).ok_or(ProtoError::UnknownMessageType(value))
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One decoded message of any type.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Type 1.
    Hello(pb::Hello),
    /// Type 2.
    HelloOk(pb::HelloOk),
    /// Type 3.
    RegisterDish(pb::RegisterDish),
    /// Type 4.
    Image(pb::Image),
    /// Type 5.
    Telemetry(pb::Telemetry),
    /// Type 6.
    SyncState(pb::SyncState),
    /// Type 7.
    SyncStateResult(pb::SyncStateResult),
    /// Type 8.
    ListPatients(pb::ListPatients),
    /// Type 9.
    PatientList(pb::PatientList),
    /// Type 10.
    Ack(pb::Ack),
    /// Type 11.
    Error(pb::Error),
    /// Type 12.
    Ping(pb::Ping),
}

/// Applies `$body` to the inner protobuf message whatever the variant.
macro_rules! with_body {
    ($message:expr, $body:ident => $action:expr) => {
        match $message {
            Message::Hello($body) => $action,
            Message::HelloOk($body) => $action,
            Message::RegisterDish($body) => $action,
            Message::Image($body) => $action,
            Message::Telemetry($body) => $action,
            Message::SyncState($body) => $action,
            Message::SyncStateResult($body) => $action,
            Message::ListPatients($body) => $action,
            Message::PatientList($body) => $action,
            Message::Ack($body) => $action,
            Message::Error($body) => $action,
            Message::Ping($body) => $action,
        }
    };
}

/// Evaluates `$action` with `$inner` bound to the inner message of every variant that has a
/// `seq` field, and `$other` for HELLO and HELLO_OK.
macro_rules! with_seq_holder {
    ($message:expr, $inner:ident => $action:expr, $other:expr) => {
        match $message {
            Message::Hello(_) | Message::HelloOk(_) => $other,
            Message::RegisterDish($inner) => $action,
            Message::Image($inner) => $action,
            Message::Telemetry($inner) => $action,
            Message::SyncState($inner) => $action,
            Message::SyncStateResult($inner) => $action,
            Message::ListPatients($inner) => $action,
            Message::PatientList($inner) => $action,
            Message::Ack($inner) => $action,
            Message::Error($inner) => $action,
            Message::Ping($inner) => $action,
        }
    };
}

impl Message {
    /// The type byte of this message.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HelloOk(_) => MessageType::HelloOk,
            Message::RegisterDish(_) => MessageType::RegisterDish,
            Message::Image(_) => MessageType::Image,
            Message::Telemetry(_) => MessageType::Telemetry,
            Message::SyncState(_) => MessageType::SyncState,
            Message::SyncStateResult(_) => MessageType::SyncStateResult,
            Message::ListPatients(_) => MessageType::ListPatients,
            Message::PatientList(_) => MessageType::PatientList,
            Message::Ack(_) => MessageType::Ack,
            Message::Error(_) => MessageType::Error,
            Message::Ping(_) => MessageType::Ping,
        }
    }

    /// The request or response sequence number; 0 for HELLO and HELLO_OK.
    pub fn seq(&self) -> u64 {
        with_seq_holder!(self, inner => inner.seq, 0)
    }

    /// Sets the sequence number; does nothing for HELLO and HELLO_OK.
    pub fn set_seq(&mut self, value: u64) {
        with_seq_holder!(self, inner => inner.seq = value, ())
    }

    /// Bytes of the payload (the protobuf encoding) without the 5-byte header.
    pub fn payload_len(&self) -> usize {
        with_body!(self, body => body.encoded_len())
    }

    /// Bytes of the whole frame: 4-byte length, type byte and payload.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.payload_len()
    }

    /// The value of the frame's length field: type byte + payload.
    pub fn frame_length(&self) -> u64 {
        1 + self.payload_len() as u64
    }

    /// Appends the whole frame to `dst`.
    ///
    /// Encoding is not limited here: the sender checks the frame against the peer's
    /// `frame_bytes_max` (see [`super::ClientSession::try_send`]). A payload of 4 GiB or more
    /// cannot be framed; the validation limits keep every message far below it.
    pub fn encode(&self, dst: &mut BytesMut) {
        let payload_len = self.payload_len();
        let length = u32::try_from(1 + payload_len).unwrap_or(u32::MAX);
        dst.reserve(FRAME_HEADER_BYTES + payload_len);
        dst.put_u32(length);
        dst.put_u8(self.message_type().as_u8());
        let encoded = with_body!(self, body => body.encode(dst));
        debug_assert!(encoded.is_ok(), "BytesMut grows on demand");
    }

    /// The whole frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut dst = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut dst);
        dst.freeze()
    }

    /// Decodes a payload of the given type. `payload` is sliced, not copied, into `bytes` fields.
    pub fn decode_payload(
        message_type: MessageType,
        payload: Bytes,
    ) -> Result<Message, ProtoError> {
        let malformed = |error: prost::DecodeError| ProtoError::Malformed {
            message_type,
            detail: error.to_string(),
        };
        let message = match message_type {
            MessageType::Hello => Message::Hello(pb::Hello::decode(payload).map_err(malformed)?),
            MessageType::HelloOk => {
                Message::HelloOk(pb::HelloOk::decode(payload).map_err(malformed)?)
            }
            MessageType::RegisterDish => {
                Message::RegisterDish(pb::RegisterDish::decode(payload).map_err(malformed)?)
            }
            MessageType::Image => Message::Image(pb::Image::decode(payload).map_err(malformed)?),
            MessageType::Telemetry => {
                Message::Telemetry(pb::Telemetry::decode(payload).map_err(malformed)?)
            }
            MessageType::SyncState => {
                Message::SyncState(pb::SyncState::decode(payload).map_err(malformed)?)
            }
            MessageType::SyncStateResult => {
                Message::SyncStateResult(pb::SyncStateResult::decode(payload).map_err(malformed)?)
            }
            MessageType::ListPatients => {
                Message::ListPatients(pb::ListPatients::decode(payload).map_err(malformed)?)
            }
            MessageType::PatientList => {
                Message::PatientList(pb::PatientList::decode(payload).map_err(malformed)?)
            }
            MessageType::Ack => Message::Ack(pb::Ack::decode(payload).map_err(malformed)?),
            MessageType::Error => Message::Error(pb::Error::decode(payload).map_err(malformed)?),
            MessageType::Ping => Message::Ping(pb::Ping::decode(payload).map_err(malformed)?),
        };
        Ok(message)
    }

    /// An ACK for the request `seq`.
    pub fn ack(seq: u64, duplicate: bool) -> Message {
        Message::Ack(pb::Ack { seq, duplicate })
    }
}
