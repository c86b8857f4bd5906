//! NBD constants and the request-header decoder (pure; fuzzed).

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The one metadata context served, and its id.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Block size constraints advertised: any byte alignment works (minimum 1), 4 KiB avoids
/// read-modify-write, and 32 MiB is the largest READ or WRITE payload accepted.
pub const BLOCK_SIZE_MIN: u32 = 1;
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
pub const PAYLOAD_MAX: u32 = 32 * 1024 * 1024;
/// Largest option payload read during the handshake (export names are at most 4 KiB).
pub const OPTION_LEN_MAX: u32 = 64 * 1024;

/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request cannot be answered: `Fatal` ends the connection (the stream cannot be trusted),
/// `Errno` is replied and the connection goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fatal(&'static str),
    Errno(u32),
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decodes a request header. Only a bad magic is fatal here.
pub fn decode_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, Verdict> {
    if be32(&b[0..4]) != REQUEST_MAGIC {
        return Err(Verdict::Fatal("bad request magic"));
    }
    Ok(RequestHeader {
        flags: be16(&b[4..6]),
        kind: be16(&b[6..8]),
        handle: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        length: be32(&b[24..28]),
    })
}

/// Checks a request against the export size and the protocol's rules. Writes whose payload is
/// too large to read are fatal (their payload cannot be skipped safely).
pub fn validate(h: &RequestHeader, size: u64, structured: bool, meta_context: bool) -> Result<(), Verdict> {
    let allowed = match h.kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        CMD_FLUSH | CMD_CACHE | CMD_DISC => 0,
        _ => return Err(Verdict::Errno(EINVAL)),
    };
    if h.kind == CMD_WRITE && h.length > PAYLOAD_MAX {
        return Err(Verdict::Fatal("write payload larger than the advertised maximum"));
    }
    if h.flags & !allowed != 0 {
        return Err(Verdict::Errno(EINVAL));
    }
    if h.flags & CMD_FLAG_DF != 0 && !structured {
        return Err(Verdict::Errno(EINVAL));
    }
    match h.kind {
        CMD_FLUSH | CMD_DISC => return Ok(()),
        CMD_BLOCK_STATUS if !meta_context => return Err(Verdict::Errno(EINVAL)),
        _ => {}
    }
    if h.length == 0 {
        return Err(Verdict::Errno(EINVAL));
    }
    if h.kind == CMD_READ && h.length > PAYLOAD_MAX {
        return Err(Verdict::Errno(EINVAL));
    }
    let end = h.offset.checked_add(u64::from(h.length));
    if end.is_none_or(|e| e > size) {
        let errno = match h.kind {
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => ENOSPC,
            _ => EINVAL,
        };
        return Err(Verdict::Errno(errno));
    }
    Ok(())
}

/// Parses `u32 len, string` at the front of `data`; returns the string and the rest.
pub fn take_name(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let end = len.checked_add(4)?;
    let name = data.get(4..end)?;
    Some((String::from_utf8(name.to_vec()).ok()?, &data[end..]))
}

/// Parses the data of NBD_OPT_INFO / NBD_OPT_GO: export name and the information types requested.
pub fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let (name, rest) = take_name(data)?;
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let reqs = rest.get(2..2 + 2 * n)?;
    if rest.len() != 2 + 2 * n {
        return None;
    }
    Some((name, reqs.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

/// Parses the data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name and queries.
/// Bounded by the data: every query consumes at least 4 bytes.
pub fn parse_meta_context_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, rest) = take_name(data)?;
    let n = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
    let mut rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..n {
        let (q, r2) = take_name(rest)?;
        queries.push(q);
        rest = r2;
    }
    rest.is_empty().then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, kind, handle: 7, offset, length }
    }

    #[test]
    fn validation() {
        let size = 1 << 20;
        assert_eq!(validate(&header(CMD_READ, 0, 0, 4096), size, false, false), Ok(()));
        assert_eq!(
            validate(&header(CMD_READ, 0, size - 1, 2), size, false, false),
            Err(Verdict::Errno(EINVAL))
        );
        assert_eq!(validate(&header(CMD_WRITE, 0, size, 1), size, false, false), Err(Verdict::Errno(ENOSPC)));
        assert_eq!(validate(&header(CMD_WRITE, 0, 0, 0), size, false, false), Err(Verdict::Errno(EINVAL)));
        assert_eq!(
            validate(&header(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), size, false, false),
            Err(Verdict::Errno(EINVAL))
        );
        assert_eq!(validate(&header(99, 0, 0, 1), size, false, false), Err(Verdict::Errno(EINVAL)));
        assert!(matches!(
            validate(&header(CMD_WRITE, 0, 0, PAYLOAD_MAX + 1), size, false, false),
            Err(Verdict::Fatal(_))
        ));
        assert_eq!(
            validate(&header(CMD_BLOCK_STATUS, 0, 0, 1), size, true, false),
            Err(Verdict::Errno(EINVAL))
        );
        assert_eq!(
            validate(&header(CMD_READ, 0, u64::MAX, 10), size, false, false),
            Err(Verdict::Errno(EINVAL))
        );
        assert_eq!(validate(&header(CMD_FLUSH, 0, 0, 0), size, false, false), Ok(()));
    }

    #[test]
    fn option_parsing() {
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"vol");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info_request(&go), Some(("vol".to_string(), vec![INFO_NAME, INFO_BLOCK_SIZE])));
        go.push(0);
        assert_eq!(parse_info_request(&go), None, "trailing bytes");
        let mut meta = 1u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"v");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(parse_meta_context_request(&meta), Some(("v".into(), vec![BASE_ALLOCATION.into()])));
        assert_eq!(parse_meta_context_request(&meta[..meta.len() - 1]), None);
        assert_eq!(take_name(&u32::MAX.to_be_bytes()), None);
    }

    proptest! {
        #[test]
        fn option_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_info_request(&bytes);
            let _ = parse_meta_context_request(&bytes);
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::array::uniform28(any::<u8>()), size in any::<u64>(),
                                 s in any::<bool>(), m in any::<bool>()) {
            if let Ok(h) = decode_request(&bytes) {
                let _ = validate(&h, size, s, m);
            }
        }
    }
}
