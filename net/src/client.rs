//! The client side of a connection, for the load generator, tools and tests: one
//! non-blocking socket (plain or TLS, same [`Transport`] as the server) with its own tiny
//! poll, so a single thread can send on a schedule and read answers as they come.

use crate::transport::{ReadStop, Transport};
use bytes::BytesMut;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SOCKET: Token = Token(0);
/// Most plaintext a client buffers before its caller consumes it.
const CLIENT_INPUT_BYTES_MAX: usize = 64 * 1024 * 1024;
const CLIENT_READ_BUDGET_BYTES: usize = 4 * 1024 * 1024;

pub struct ClientConn {
    poll: Poll,
    events: Events,
    transport: Transport,
    input: BytesMut,
    eof: bool,
    interest: Interest,
}

/// How to secure a client connection.
#[derive(Clone)]
pub enum ClientTls {
    Plain,
    Tls {
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    },
}

impl ClientConn {
    pub fn connect(addr: SocketAddr, tls: &ClientTls, timeout: Duration) -> io::Result<ClientConn> {
        let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        ClientConn::over(stream, tls)
    }

    /// A connection over a TCP stream connected already (from a chosen source address, say).
    pub fn over(stream: std::net::TcpStream, tls: &ClientTls) -> io::Result<ClientConn> {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        let mut socket = mio::net::TcpStream::from_std(stream);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE | Interest::WRITABLE)?;
        let transport = match tls {
            ClientTls::Plain => Transport::plain(socket),
            ClientTls::Tls {
                config,
                server_name,
            } => {
                let connection = rustls::ClientConnection::new(config.clone(), server_name.clone())
                    .map_err(|error| io::Error::other(error.to_string()))?;
                Transport::tls(socket, rustls::Connection::Client(connection))
            }
        };
        Ok(ClientConn {
            poll,
            events: Events::with_capacity(8),
            transport,
            input: BytesMut::new(),
            eof: false,
            interest: Interest::READABLE | Interest::WRITABLE,
        })
    }

    /// Queues plaintext; [`ClientConn::pump`] sends it.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.transport.queue(bytes);
    }

    /// Plaintext received and not yet consumed by the caller.
    pub fn input(&mut self) -> &mut BytesMut {
        &mut self.input
    }

    pub fn pending_output_bytes(&self) -> usize {
        self.transport.pending_output_bytes()
    }

    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Sends what it can, then waits until something arrives or `deadline` passes, and reads
    /// what arrived. Returns the plaintext bytes read.
    pub fn pump(&mut self, deadline: Instant) -> io::Result<usize> {
        let mut total = self.read_available()?;
        self.transport.flush()?;
        if total > 0 || self.eof {
            return Ok(total);
        }
        loop {
            self.update_interest()?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(total);
            }
            match self.poll.poll(&mut self.events, Some(deadline - now)) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
            self.transport.flush()?;
            total += self.read_available()?;
            self.transport.flush()?;
            if total > 0 || self.eof {
                return Ok(total);
            }
        }
    }

    /// Pumps until everything queued has been handed to the socket (or the deadline).
    pub fn flush_until(&mut self, deadline: Instant) -> io::Result<bool> {
        loop {
            let flushed = self.transport.flush()? && !self.transport.wants_write();
            if flushed && !self.transport.is_handshaking() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            self.pump(deadline.min(Instant::now() + Duration::from_millis(50)))?;
            if self.eof {
                return Ok(false);
            }
        }
    }

    fn read_available(&mut self) -> io::Result<usize> {
        if self.eof {
            return Ok(0);
        }
        let (count, stop) = self.transport.read_into(
            &mut self.input,
            CLIENT_INPUT_BYTES_MAX,
            CLIENT_READ_BUDGET_BYTES,
        )?;
        if stop == ReadStop::Eof {
            self.eof = true;
        }
        Ok(count)
    }

    fn update_interest(&mut self) -> io::Result<()> {
        let wanted = if self.transport.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if wanted != self.interest {
            self.interest = wanted;
            self.poll
                .registry()
                .reregister(self.transport.socket_mut(), SOCKET, wanted)?;
        }
        Ok(())
    }

    /// Half-closes: nothing more will be sent (queued bytes are flushed first by the caller);
    /// answers can still be read.
    pub fn shutdown_write(&mut self) {
        self.transport.shutdown_write();
    }

    /// Closes the connection at once (a pulled cable, as far as the server can tell, once
    /// the socket is gone).
    pub fn shutdown(&mut self) {
        self.transport.shutdown();
    }
}
