//! A small blocking netlink socket and attribute codec, for the families the
//! rtnetlink crates do not cover: generic netlink (IPVS) and XFRM.
//!
//! Requests carry `NLM_F_ACK` and are answered in order, so a call returns
//! either the kernel's replies (a dump's parts) or its error, with the
//! operation named by the caller.

use std::{io, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_EXCL: u16 = 0x200;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const HDR: usize = 16;

/// A kernel refusal: the errno, with what was asked.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct NlError {
    pub op: String,
    #[source]
    pub source: io::Error,
}

impl NlError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

pub struct NlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl NlSocket {
    /// Opens a netlink socket of `protocol` in the calling thread's namespace.
    pub fn open(protocol: i32) -> io::Result<NlSocket> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is a valid "let the kernel pick" address.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NlSocket { fd, seq: 1 })
    }

    /// Sends one message (`kind`, `flags` | REQUEST | ACK, `payload`) and
    /// returns the payloads of every reply before the ack or DONE.
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        payload: &[u8],
        op: impl FnOnce() -> String,
    ) -> Result<Vec<Vec<u8>>, NlError> {
        let fail = |op: String, e: io::Error| NlError { op, source: e };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = HDR + payload.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(fail(op(), io::Error::last_os_error()));
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is a valid, writable buffer of buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(fail(op(), e));
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= HDR {
                let mlen = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let mkind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let mseq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if mlen < HDR || mlen > rest.len() {
                    return Err(fail(
                        op(),
                        io::Error::new(io::ErrorKind::InvalidData, "truncated netlink reply"),
                    ));
                }
                let body = &rest[HDR..mlen];
                rest = &rest[align(mlen).min(rest.len())..];
                if mseq != seq {
                    continue;
                }
                match mkind {
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(body[0..4].try_into().unwrap());
                        if code == 0 {
                            return Ok(replies);
                        }
                        return Err(fail(op(), io::Error::from_raw_os_error(-code)));
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(body.to_vec()),
                }
            }
        }
    }
}

pub const fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds a run of netlink attributes.
#[derive(Default)]
pub struct Attrs(pub Vec<u8>);

impl Attrs {
    pub fn new() -> Attrs {
        Attrs::default()
    }

    pub fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(align(self.0.len()), 0);
        self
    }

    pub fn u16(&mut self, kind: u16, v: u16) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    pub fn str(&mut self, kind: u16, v: &str) -> &mut Self {
        let mut b = v.as_bytes().to_vec();
        b.push(0);
        self.put(kind, &b)
    }

    pub fn nested(&mut self, kind: u16, inner: &Attrs) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

/// Iterates `(kind, value)` over a run of attributes (nesting flag cleared).
pub fn parse_attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & !(NLA_F_NESTED | (1 << 14));
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, value))
    })
}

pub fn get_u16(v: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?))
}

pub fn get_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_nesting() {
        let mut inner = Attrs::new();
        inner.u16(1, 2).str(6, "mh");
        let mut outer = Attrs::new();
        outer.nested(1, &inner).u32(2, 7);
        assert_eq!(outer.0.len() % 4, 0);
        let got: Vec<(u16, Vec<u8>)> = parse_attrs(&outer.0)
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 1, "nesting flag cleared");
        let inner_got: Vec<(u16, Vec<u8>)> = parse_attrs(&got[0].1)
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(inner_got[0], (1, 2u16.to_ne_bytes().to_vec()));
        assert_eq!(inner_got[1], (6, b"mh\0".to_vec()));
        assert_eq!(get_u32(&got[1].1), Some(7));
        // A truncated run ends the iteration instead of reading past it.
        assert_eq!(parse_attrs(&outer.0[..6]).count(), 0);
    }
}
