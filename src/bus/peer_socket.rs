//! The daemon's end of a direct subscription's socket, as zbus reads and writes it.
//!
//! zbus reads a message's 16-byte primary header, then allocates, and zeroes, the whole
//! length the header announces (up to the specification's 128 MiB) before the rest
//! arrives. On the bus that is harmless: the bus daemon has received and judged every
//! message first. On a direct connection the peer is whoever holds the fd, and a header
//! announcing 128 MiB followed by silence would make the daemon hold 128 MiB for as long
//! as the peer likes, per direct subscription. So the read half here follows the peer's
//! stream as it passes — the authentication lines, then each message's header and body
//! — and fails the connection, before zbus allocates anything, when a message would be
//! longer than [`MAX_INCOMING`]: every call a subscription takes (AddWatch, SetFilter,
//! Snapshot, ...) is far smaller. The connection's end ends the subscription, as a
//! closed fd does.
//!
//! No file descriptors travel on it: nothing the subscription interface takes or sends
//! carries one, so neither half says it can pass them.

use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, OwnedFd};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use zbus::connection::socket::{BoxedSplit, ReadHalf, Split, WriteHalf};
use zbus::connection::AuthMechanism;
use zbus::export::async_trait::async_trait;
use zbus::Message;

/// The longest message a direct connection's peer may send, in bytes.
pub(super) const MAX_INCOMING: usize = 64 * 1024;

/// The longest authentication line accepted (the client's `AUTH`, `NEGOTIATE_UNIX_FD`,
/// `BEGIN`, ... are a few dozen bytes).
const MAX_AUTH_LINE: usize = 1024;

/// A D-Bus message's primary header: endianness, type, flags, version, body length,
/// serial, and the length of the header fields' array.
const PRIMARY_HEADER: usize = 16;

/// Messages joined in one vectored write.
const MESSAGES_PER_WRITE: usize = 64;

/// The two halves zbus drives, over `stream`.
pub(super) fn split(stream: tokio::net::UnixStream) -> BoxedSplit {
    let (read, write) = stream.into_split();
    Split::new(
        Box::new(Reader {
            socket: read,
            framing: Framing::default(),
        }),
        Box::new(Writer(write)),
    )
}

/// Where the peer's stream is.
#[derive(Debug)]
enum Framing {
    /// The authentication lines, up to `BEGIN` (after the one NUL byte a client sends
    /// first).
    Auth { started: bool, line: Vec<u8> },
    /// A message's primary header, `have` bytes of it in.
    Header {
        bytes: [u8; PRIMARY_HEADER],
        have: usize,
    },
    /// The rest of a message.
    Body { left: usize },
}

impl Default for Framing {
    fn default() -> Framing {
        Framing::Auth {
            started: false,
            line: Vec::new(),
        }
    }
}

impl Framing {
    fn header() -> Framing {
        Framing::Header {
            bytes: [0; PRIMARY_HEADER],
            have: 0,
        }
    }

    /// Follows `bytes` of the peer's stream; an error when a message would be longer
    /// than [`MAX_INCOMING`] or an authentication line longer than [`MAX_AUTH_LINE`].
    fn follow(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while let Some((&byte, rest)) = bytes.split_first() {
            match self {
                Framing::Auth { started, line } => {
                    bytes = rest;
                    if !*started {
                        *started = true;
                        if byte == 0 {
                            continue;
                        }
                    }
                    line.push(byte);
                    if line.ends_with(b"\r\n") {
                        let begin = line.as_slice() == b"BEGIN\r\n";
                        line.clear();
                        if begin {
                            *self = Framing::header();
                        }
                    } else if line.len() > MAX_AUTH_LINE {
                        return Err(refused(format!(
                            "an authentication line longer than {MAX_AUTH_LINE} bytes"
                        )));
                    }
                }
                Framing::Header {
                    bytes: header,
                    have,
                } => {
                    let take = (PRIMARY_HEADER - *have).min(bytes.len());
                    header[*have..*have + take].copy_from_slice(&bytes[..take]);
                    *have += take;
                    bytes = &bytes[take..];
                    if *have == PRIMARY_HEADER {
                        let length = message_length(header)?;
                        if length > MAX_INCOMING {
                            return Err(refused(format!(
                                "a message of {length} bytes (at most {MAX_INCOMING})"
                            )));
                        }
                        *self = match length - PRIMARY_HEADER {
                            0 => Framing::header(),
                            left => Framing::Body { left },
                        };
                    }
                }
                Framing::Body { left } => {
                    let take = (*left).min(bytes.len());
                    *left -= take;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        *self = Framing::header();
                    }
                }
            }
        }
        Ok(())
    }
}

/// The whole length of the message a primary header opens (the D-Bus specification's
/// layout: the header fields' array is padded to 8 bytes, then the body).
fn message_length(header: &[u8; PRIMARY_HEADER]) -> io::Result<usize> {
    let word = |at: usize| {
        let bytes = [header[at], header[at + 1], header[at + 2], header[at + 3]];
        match header[0] {
            b'l' => Ok(u32::from_le_bytes(bytes)),
            b'B' => Ok(u32::from_be_bytes(bytes)),
            other => Err(refused(format!(
                "a message with endianness byte {other:#04x}"
            ))),
        }
    };
    let (body, fields) = (word(4)? as usize, word(12)? as usize);
    Ok((PRIMARY_HEADER + fields).next_multiple_of(8) + body)
}

fn refused(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("direct connection closed: its peer sent {what}"),
    )
}

#[derive(Debug)]
struct Reader {
    socket: OwnedReadHalf,
    framing: Framing,
}

#[async_trait]
impl ReadHalf for Reader {
    async fn recvmsg(&mut self, buffer: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let read = self.socket.read(buffer).await?;
        // Judged before zbus sees the bytes, so a header announcing too long a message
        // fails the read that brought it, before anything is allocated for it.
        self.framing.follow(&buffer[..read])?;
        Ok((read, Vec::new()))
    }

    fn auth_mechanism(&self) -> AuthMechanism {
        // Peer credentials on a socket pair the daemon made are the daemon's own.
        AuthMechanism::Anonymous
    }
}

#[derive(Debug)]
struct Writer(OwnedWriteHalf);

#[async_trait]
impl WriteHalf for Writer {
    async fn sendmsg(&mut self, buffer: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        if !fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no file descriptors travel on a direct connection",
            ));
        }
        self.0.write(buffer).await
    }

    /// A batch of signals in as few writes as the socket takes, as zbus's own sockets
    /// do: one `writev` per [`MESSAGES_PER_WRITE`] messages, its rest in the next.
    async fn send_messages(&mut self, messages: &[Message]) -> zbus::Result<()> {
        for batch in messages.chunks(MESSAGES_PER_WRITE) {
            if batch.iter().any(|m| !m.data().fds().is_empty()) {
                return Err(zbus::Error::Unsupported);
            }
            let mut slices: Vec<IoSlice<'_>> =
                batch.iter().map(|m| IoSlice::new(m.data())).collect();
            let mut slices = slices.as_mut_slice();
            while !slices.is_empty() {
                let written = self.0.write_vectored(slices).await?;
                if written == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                }
                IoSlice::advance_slices(&mut slices, written);
            }
        }
        Ok(())
    }

    async fn close(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A primary header (little-endian, method call) announcing `body` bytes of body
    /// after `fields` bytes of header fields.
    fn header(body: u32, fields: u32) -> Vec<u8> {
        let mut h = vec![b'l', 1, 0, 1];
        h.extend(body.to_le_bytes());
        h.extend(1u32.to_le_bytes());
        h.extend(fields.to_le_bytes());
        h
    }

    /// A whole message of that shape (its contents do not matter to the framing).
    fn message(body: u32, fields: u32) -> Vec<u8> {
        let mut m = header(body, fields);
        let length = (16 + fields as usize).next_multiple_of(8) + body as usize;
        m.resize(length, 0);
        m
    }

    fn stream(messages: &[Vec<u8>]) -> Vec<u8> {
        let mut s = b"\0AUTH ANONYMOUS 6c6962\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n".to_vec();
        for m in messages {
            s.extend(m);
        }
        s
    }

    /// Messages of every legal size up to the bound pass, however the stream is cut:
    /// whole, and a byte at a time.
    #[test]
    fn messages_within_the_bound_pass_however_the_stream_is_cut() {
        let largest = u32::try_from(MAX_INCOMING).expect("64 KiB") - 24;
        let s = stream(&[message(0, 0), message(13, 37), message(largest, 5)]);
        let mut whole = Framing::default();
        whole.follow(&s).expect("whole");
        assert!(
            matches!(whole, Framing::Header { have: 0, .. }),
            "{whole:?}"
        );
        let mut bytes = Framing::default();
        for b in &s {
            bytes
                .follow(std::slice::from_ref(b))
                .expect("a byte at a time");
        }
        assert!(
            matches!(bytes, Framing::Header { have: 0, .. }),
            "{bytes:?}"
        );
    }

    /// A header announcing more than the bound fails as soon as its 16 bytes are in,
    /// in either byte order, and so does a header with no valid byte order.
    #[test]
    fn a_header_announcing_too_long_a_message_fails_at_once() {
        let s = stream(&[message(10, 0), header(100 << 20, 0)]);
        let err = Framing::default().follow(&s).expect_err("100 MiB");
        assert!(err.to_string().contains("at most 65536"), "{err}");
        let mut big = header(0, 0);
        big[0] = b'B';
        let max = u32::try_from(MAX_INCOMING).expect("64 KiB");
        big[4..8].copy_from_slice(&max.to_be_bytes());
        assert!(Framing::default().follow(&stream(&[big])).is_err());
        let mut odd = header(0, 0);
        odd[0] = b'x';
        let err = Framing::default().follow(&stream(&[odd])).expect_err("x");
        assert!(err.to_string().contains("endianness"), "{err}");
    }

    /// An authentication line without end is refused past its bound.
    #[test]
    fn an_endless_authentication_line_is_refused() {
        let mut s = b"\0AUTH ".to_vec();
        s.resize(MAX_AUTH_LINE + 10, b'A');
        assert!(Framing::default().follow(&s).is_err());
    }
}
