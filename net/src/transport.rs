//! One connection's byte transport: a non-blocking mio socket, plain or wrapped in rustls.
//!
//! The transport only moves bytes: plaintext in from the socket (decrypting when TLS is on),
//! plaintext out to the socket (encrypting). It reads until the socket would block or a
//! budget is spent, and never buffers more than its caller allows.

use bytes::{Buf, BytesMut};
use mio::net::TcpStream;
use std::io::{self, Read, Write};

/// Plaintext read in one call of [`Transport::read_into`] at most, per chunk.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// What a read pass ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStop {
    /// The socket would block: everything available was read.
    Drained,
    /// The budget or the input limit stopped the read; more may be waiting.
    Budget,
    /// The peer closed its side.
    Eof,
}

pub struct Transport {
    socket: TcpStream,
    tls: Option<Box<rustls::Connection>>,
    /// Plaintext waiting to be handed to rustls or the socket.
    out: BytesMut,
    /// The orderly close began (TLS close_notify queued): nothing more may be sent.
    close_sent: bool,
    /// TLS: what rustls said after it last processed records, so a read sizes its buffer
    /// to the plaintext there is instead of zero-filling a whole chunk for nothing.
    tls_state: TlsReadState,
}

#[derive(Debug, Default, Clone, Copy)]
struct TlsReadState {
    /// Decrypted bytes waiting in rustls.
    plaintext_bytes: usize,
    /// The peer sent close_notify.
    peer_closed: bool,
}

impl Transport {
    pub fn plain(socket: TcpStream) -> Transport {
        Transport {
            socket,
            tls: None,
            out: BytesMut::new(),
            close_sent: false,
            tls_state: TlsReadState::default(),
        }
    }

    pub fn tls(socket: TcpStream, connection: rustls::Connection) -> Transport {
        Transport {
            socket,
            tls: Some(Box::new(connection)),
            out: BytesMut::new(),
            close_sent: false,
            tls_state: TlsReadState::default(),
        }
    }

    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }

    pub fn socket_mut(&mut self) -> &mut TcpStream {
        &mut self.socket
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True while a TLS handshake is still under way.
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.is_handshaking())
    }

    /// The peer's certificate chain, once a TLS handshake has completed.
    pub fn peer_certificates(&self) -> Option<Vec<Vec<u8>>> {
        let tls = self.tls.as_ref()?;
        let chain = tls.peer_certificates()?;
        Some(chain.iter().map(|cert| cert.as_ref().to_vec()).collect())
    }

    /// Reads plaintext into `input` until the socket would block, `budget_bytes` were read,
    /// or `input` holds `input_bytes_max` bytes.
    pub fn read_into(
        &mut self,
        input: &mut BytesMut,
        input_bytes_max: usize,
        budget_bytes: usize,
    ) -> io::Result<(usize, ReadStop)> {
        let mut total = 0usize;
        loop {
            let room = input_bytes_max.saturating_sub(input.len());
            let allowed = room
                .min(budget_bytes.saturating_sub(total))
                .min(READ_CHUNK_BYTES);
            if allowed == 0 {
                return Ok((total, ReadStop::Budget));
            }
            let step = match self.tls.as_mut() {
                None => read_chunk(&mut self.socket, input, allowed)?,
                Some(tls) => {
                    read_tls_chunk(tls, &mut self.tls_state, &mut self.socket, input, allowed)?
                }
            };
            match step {
                Step::Read(count) => total += count,
                Step::Progress => {}
                Step::WouldBlock => return Ok((total, ReadStop::Drained)),
                Step::Eof => return Ok((total, ReadStop::Eof)),
            }
        }
    }

    /// Queues plaintext for sending; [`Transport::flush`] moves it out. Ignored once the
    /// orderly close began (bytes after a TLS close_notify would never be read).
    pub fn queue(&mut self, bytes: &[u8]) {
        if !self.close_sent {
            self.out.extend_from_slice(bytes);
        }
    }

    /// Moves everything possible to the socket. `Ok(true)` when nothing is left to send.
    pub fn flush(&mut self) -> io::Result<bool> {
        match self.tls.as_mut() {
            None => flush_plain(&mut self.socket, &mut self.out),
            Some(tls) => flush_tls(tls, &mut self.socket, &mut self.out),
        }
    }

    /// Plaintext not yet handed to the socket (or to rustls).
    pub fn pending_output_bytes(&self) -> usize {
        self.out.len()
    }

    pub fn wants_write(&self) -> bool {
        !self.out.is_empty() || self.tls.as_ref().is_some_and(|tls| tls.wants_write())
    }

    /// Starts an orderly close, once everything written was handed on: a TLS close_notify
    /// is queued (sent by the next flush); later writes are dropped.
    pub fn send_close(&mut self) {
        debug_assert!(
            self.out.is_empty(),
            "close_notify must follow the last plaintext"
        );
        self.close_sent = true;
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
        }
    }

    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// Half-close: our side is done sending; the peer can still be read (to EOF).
    pub fn shutdown_write(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Write);
    }

    pub fn shutdown(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

enum Step {
    Read(usize),
    /// Ciphertext was consumed but no plaintext came out yet (a handshake record).
    Progress,
    WouldBlock,
    Eof,
}

fn read_chunk(socket: &mut TcpStream, input: &mut BytesMut, allowed: usize) -> io::Result<Step> {
    let start = input.len();
    input.resize(start + allowed, 0);
    let result = socket.read(&mut input[start..]);
    let count = *result.as_ref().unwrap_or(&0);
    input.truncate(start + count);
    match result {
        Ok(0) => Ok(Step::Eof),
        Ok(count) => Ok(Step::Read(count)),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(Step::WouldBlock),
        Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(Step::Progress),
        Err(error) => Err(error),
    }
}

fn read_tls_chunk(
    tls: &mut rustls::Connection,
    state: &mut TlsReadState,
    socket: &mut TcpStream,
    input: &mut BytesMut,
    allowed: usize,
) -> io::Result<Step> {
    // Plaintext already decrypted comes first, read into exactly as much buffer as there is
    // of it.
    if state.plaintext_bytes > 0 {
        let start = input.len();
        input.resize(start + allowed.min(state.plaintext_bytes), 0);
        let result = tls.reader().read(&mut input[start..]);
        let count = *result.as_ref().unwrap_or(&0);
        input.truncate(start + count);
        match result {
            Ok(0) => return Ok(Step::Eof),
            Ok(count) => {
                state.plaintext_bytes = state.plaintext_bytes.saturating_sub(count);
                return Ok(Step::Read(count));
            }
            // rustls has less than it said: ask it again after the next records.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => state.plaintext_bytes = 0,
            Err(error) => return Err(error),
        }
    }
    if state.peer_closed {
        return Ok(Step::Eof);
    }
    match tls.read_tls(socket) {
        Ok(0) => Ok(Step::Eof),
        Ok(_) => match tls.process_new_packets() {
            Ok(io_state) => {
                state.plaintext_bytes = io_state.plaintext_bytes_to_read();
                state.peer_closed = io_state.peer_has_closed();
                Ok(Step::Progress)
            }
            Err(error) => {
                // Try to tell the peer why (the alert is queued by rustls).
                let _ = tls.write_tls(socket);
                Err(io::Error::new(io::ErrorKind::InvalidData, error))
            }
        },
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(Step::WouldBlock),
        Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(Step::Progress),
        Err(error) => Err(error),
    }
}

fn flush_plain(socket: &mut TcpStream, out: &mut BytesMut) -> io::Result<bool> {
    while !out.is_empty() {
        match socket.write(out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(count) => out.advance(count),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(true)
}

fn flush_tls(
    tls: &mut rustls::Connection,
    socket: &mut TcpStream,
    out: &mut BytesMut,
) -> io::Result<bool> {
    loop {
        let mut progressed = false;
        if !out.is_empty() {
            let accepted = tls.writer().write(out)?;
            out.advance(accepted);
            progressed |= accepted > 0;
        }
        while tls.wants_write() {
            match tls.write_tls(socket) {
                Ok(_) => progressed = true,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        if out.is_empty() {
            return Ok(true);
        }
        if !progressed {
            // rustls holds plaintext until its handshake completes; nothing more to do now.
            return Ok(false);
        }
    }
}
