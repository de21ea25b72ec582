//! Listeners whose service is not part of this version yet (viewer, web interface, public
//! API) still bind their configured address, so the configuration is checked and the port is
//! held, and they tell a client plainly that the service is unavailable instead of hanging.

use bytes::BytesMut;
use es_net::{CloseReason, ConnHandle, Service, Session, SessionIo};
use std::net::SocketAddr;
use std::time::Instant;

pub struct UnavailableService {
    pub name: &'static str,
    /// What a client is told before the connection closes (an HTTP 503 for HTTP ports).
    pub answer: Vec<u8>,
}

impl UnavailableService {
    pub fn http(name: &'static str, what: &str) -> UnavailableService {
        let body = format!(
            "{{\"code\":\"service_unavailable\",\"message\":\"the {what} is not available in this version of esserver\"}}"
        );
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            body.len(),
            body
        );
        UnavailableService {
            name,
            answer: answer.into_bytes(),
        }
    }

    pub fn silent(name: &'static str) -> UnavailableService {
        UnavailableService {
            name,
            answer: Vec::new(),
        }
    }
}

impl Service for UnavailableService {
    type Msg = ();
    type Session = UnavailableSession;

    fn name(&self) -> &'static str {
        self.name
    }

    fn open(
        &self,
        _peer: SocketAddr,
        _handle: ConnHandle<()>,
        _now: Instant,
    ) -> UnavailableSession {
        UnavailableSession {
            answer: self.answer.clone(),
        }
    }
}

pub struct UnavailableSession {
    answer: Vec<u8>,
}

impl Session for UnavailableSession {
    type Msg = ();

    fn on_input(&mut self, input: &mut BytesMut, io: &mut SessionIo<'_>) {
        input.clear();
        io.write(&self.answer);
        io.close(CloseReason::Requested(
            "service not available in this version".into(),
        ));
    }

    fn on_message(&mut self, _message: (), _io: &mut SessionIo<'_>) {}

    fn on_shutdown(&mut self, io: &mut SessionIo<'_>) {
        io.close(CloseReason::Shutdown);
    }

    fn on_closed(&mut self, _reason: &CloseReason) {}

    fn is_established(&self) -> bool {
        true
    }
}
