//! Frames: the unit of the node RPC byte stream.
//!
//! ```text
//! 0        4        6        8                16         20         24
//! | magic  | version| kind   | request id     | body len | crc32c   | body (body len bytes)
//! | "CRPC" |  u16   |  u16   |      u64       |   u32    |   u32    |
//! ```
//!
//! All integers are little endian. `crc32c` covers header bytes 0..20 and the body, so a damaged
//! request id or length is caught as surely as damaged data. `version` is 0 in hello frames and the
//! negotiated version afterwards.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use cairn_types::limits::RPC_IO_MAX_BYTES;

/// First bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"CRPC";
/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 24;
/// Largest body: the largest data payload plus 64 KiB for the checksums (5 bytes each at most for
/// 1024 blocks) and fixed fields. Anything larger is refused before it is buffered.
pub const FRAME_BODY_MAX_BYTES: u32 = RPC_IO_MAX_BYTES + 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Client's opening frame: a [`crate::Hello`].
    Hello,
    /// Server's answer to the hello: a [`crate::HelloReply`].
    HelloReply,
    /// A [`crate::Request`].
    Request,
    /// A [`crate::Response`] to the request with the same id.
    Response,
}

impl FrameKind {
    fn code(self) -> u16 {
        match self {
            FrameKind::Hello => 1,
            FrameKind::HelloReply => 2,
            FrameKind::Request => 3,
            FrameKind::Response => 4,
        }
    }

    fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => FrameKind::Hello,
            2 => FrameKind::HelloReply,
            3 => FrameKind::Request,
            4 => FrameKind::Response,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub version: u16,
    pub kind: FrameKind,
    pub request_id: u64,
    pub body: Bytes,
}

/// Why bytes are not a valid frame. Every one of these ends the connection: after a bad frame the
/// stream cannot be resynchronised.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("frame body of {len} bytes exceeds the limit of {FRAME_BODY_MAX_BYTES}")]
    TooLarge { len: u32 },
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

fn frame_crc(header: &[u8], body: &[u8]) -> u32 {
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    digest.update(header);
    digest.update(body);
    (digest.finalize() & 0xffff_ffff) as u32
}

impl Frame {
    /// Appends the encoded frame to `dst`. A body over the limit is refused with
    /// [`FrameError::TooLarge`] and nothing is appended (a sender with an oversized message gets an
    /// error to handle, never a panic).
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = u32::try_from(self.body.len()).unwrap_or(u32::MAX);
        if len > FRAME_BODY_MAX_BYTES {
            return Err(FrameError::TooLarge { len });
        }
        dst.reserve(FRAME_HEADER_BYTES + self.body.len());
        let mut header = [0u8; 20];
        header[0..4].copy_from_slice(&FRAME_MAGIC);
        header[4..6].copy_from_slice(&self.version.to_le_bytes());
        header[6..8].copy_from_slice(&self.kind.code().to_le_bytes());
        header[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        header[16..20].copy_from_slice(&len.to_le_bytes());
        dst.put_slice(&header);
        dst.put_u32_le(frame_crc(&header, &self.body));
        dst.put_slice(&self.body);
        Ok(())
    }

    /// Decodes one frame from the front of `src`, consuming it. `Ok(None)` means more bytes are
    /// needed; the header is validated (magic, kind, length) before any body is awaited, so a peer
    /// cannot make us buffer more than one maximal frame.
    pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&src[0..4]);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let kind_code = u16::from_le_bytes([src[6], src[7]]);
        let kind = FrameKind::from_code(kind_code).ok_or(FrameError::UnknownKind(kind_code))?;
        let len = u32::from_le_bytes([src[16], src[17], src[18], src[19]]);
        if len > FRAME_BODY_MAX_BYTES {
            return Err(FrameError::TooLarge { len });
        }
        let total = FRAME_HEADER_BYTES + len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let expect = u32::from_le_bytes([src[20], src[21], src[22], src[23]]);
        if frame_crc(&src[0..20], &src[FRAME_HEADER_BYTES..total]) != expect {
            return Err(FrameError::BadChecksum);
        }
        let version = u16::from_le_bytes([src[4], src[5]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&src[8..16]);
        let request_id = u64::from_le_bytes(id);
        src.advance(FRAME_HEADER_BYTES);
        let body = src.split_to(len as usize).freeze();
        Ok(Some(Frame { version, kind, request_id, body }))
    }
}

/// tokio-util codec for [`Frame`]s.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        Frame::decode(src)
    }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        frame.encode(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = FrameKind> {
        prop_oneof![
            Just(FrameKind::Hello),
            Just(FrameKind::HelloReply),
            Just(FrameKind::Request),
            Just(FrameKind::Response)
        ]
    }

    proptest! {
        #[test]
        fn round_trip(version in any::<u16>(), kind in kind(), id in any::<u64>(),
                      body in proptest::collection::vec(any::<u8>(), 0..2048), split in 0usize..4096) {
            let frame = Frame { version, kind, request_id: id, body: Bytes::from(body) };
            let mut buf = BytesMut::new();
            frame.encode(&mut buf).unwrap();
            // Fed in two pieces, as a socket would.
            let split = split.min(buf.len());
            let mut partial = BytesMut::from(&buf[..split]);
            let first = Frame::decode(&mut partial).unwrap();
            if split < buf.len() {
                prop_assert!(first.is_none());
                partial.extend_from_slice(&buf[split..]);
                prop_assert_eq!(Frame::decode(&mut partial).unwrap(), Some(frame));
            } else {
                prop_assert_eq!(first, Some(frame));
            }
            prop_assert!(partial.is_empty());
        }

        #[test]
        fn any_flipped_bit_is_caught(id in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 1..64),
                                     bit in any::<proptest::sample::Index>()) {
            let frame = Frame { version: 1, kind: FrameKind::Request, request_id: id, body: Bytes::from(body) };
            let mut buf = BytesMut::new();
            frame.encode(&mut buf).unwrap();
            let bit = bit.index(buf.len() * 8);
            // Flipping a length bit may make the frame look incomplete; that is not acceptance.
            buf[bit / 8] ^= 1 << (bit % 8);
            let decoded = Frame::decode(&mut buf);
            prop_assert!(!matches!(decoded, Ok(Some(_))), "damaged frame accepted: {:?}", decoded);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = Frame::decode(&mut buf);
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_slice(&FRAME_MAGIC);
        buf.put_u16_le(1);
        buf.put_u16_le(3);
        buf.put_u64_le(1);
        buf.put_u32_le(FRAME_BODY_MAX_BYTES + 1);
        buf.put_u32_le(0);
        assert!(matches!(Frame::decode(&mut buf), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn an_oversized_body_is_an_error_to_send_not_a_panic() {
        let body = Bytes::from(vec![0u8; FRAME_BODY_MAX_BYTES as usize + 1]);
        let mut buf = BytesMut::new();
        let frame = Frame { version: 1, kind: FrameKind::Response, request_id: 7, body };
        assert!(matches!(frame.encode(&mut buf), Err(FrameError::TooLarge { .. })));
        assert!(buf.is_empty(), "nothing of a refused frame is written");
    }
}
