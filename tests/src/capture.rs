//! Packet capture without tcpdump: an AF_PACKET socket opened inside a
//! namespace, read by a thread until the capture is finished, plus a decoder
//! for the VXLAN frames in it.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use crate::Netns;

const ETH_P_ALL: u16 = 0x0003;

/// Every frame seen on every interface of a namespace while it runs.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    /// Starts capturing in `ns` (all interfaces, both directions).
    pub fn start(ns: &Netns) -> Capture {
        let fd = ns.enter(|| {
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL.to_be()),
                )
            };
            assert!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: raw is a fresh, valid fd.
            unsafe { OwnedFd::from_raw_fd(raw) }
        });
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: valid fd and a timeval of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            // Read until told to stop, then drain what is already queued.
            loop {
                // SAFETY: buf is valid for buf.len() bytes.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                } else if s.load(Ordering::SeqCst) {
                    break;
                }
            }
            frames
        });
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the frames, in order.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("not finished twice")
            .join()
            .expect("capture thread")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A VXLAN packet as seen on the underlay.
#[derive(Debug, Clone)]
pub struct VxlanFrame {
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub vni: u32,
    /// The encapsulated Ethernet frame.
    pub inner: Vec<u8>,
}

impl VxlanFrame {
    pub fn inner_dst_mac(&self) -> [u8; 6] {
        self.inner[..6].try_into().expect("checked length")
    }

    pub fn inner_ethertype(&self) -> u16 {
        u16::from_be_bytes([self.inner[12], self.inner[13]])
    }

    /// ARP, or a broadcast/multicast destination: what a flooding overlay sends.
    pub fn is_flood(&self) -> bool {
        self.inner_ethertype() == 0x0806 || self.inner[0] & 1 == 1
    }
}

/// Decodes Ethernet/IPv4/UDP:4789/VXLAN frames; everything else is skipped.
pub fn vxlan_frames(frames: &[Vec<u8>]) -> Vec<VxlanFrame> {
    frames.iter().filter_map(|f| decode_vxlan(f)).collect()
}

fn decode_vxlan(f: &[u8]) -> Option<VxlanFrame> {
    if f.len() < 14 || u16::from_be_bytes([f[12], f[13]]) != 0x0800 {
        return None;
    }
    let ip = &f[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let udp = ip.get(ihl..)?;
    if udp.len() < 8 + 8 + 14 || u16::from_be_bytes([udp[2], udp[3]]) != 4789 {
        return None;
    }
    let vx = &udp[8..];
    Some(VxlanFrame {
        outer_src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        outer_dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        vni: u32::from_be_bytes([0, vx[4], vx[5], vx[6]]),
        inner: vx[8..].to_vec(),
    })
}

/// An ESP packet as seen on the underlay: its addresses and SPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EspPacket {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub spi: u32,
}

/// Decodes Ethernet/IPv4/ESP frames; everything else is skipped.
pub fn esp_packets(frames: &[Vec<u8>]) -> Vec<EspPacket> {
    frames
        .iter()
        .filter_map(|f| {
            if f.len() < 14 || u16::from_be_bytes([f[12], f[13]]) != 0x0800 {
                return None;
            }
            let ip = &f[14..];
            if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 50 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let esp = ip.get(ihl..ihl + 4)?;
            Some(EspPacket {
                src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
                spi: u32::from_be_bytes(esp.try_into().ok()?),
            })
        })
        .collect()
}
