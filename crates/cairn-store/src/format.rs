//! The on-disk format of chunk files and volume metadata files (diagrams: docs/on-disk-format.md).
//!
//! A chunk file is three regions, each a whole number of 4 KiB blocks:
//!
//! ```text
//! offset 0                 4096                         4096 + table_len
//! | header (1 block)       | block table (8 B/block)    | data (chunk_size bytes, sparse)
//! ```
//!
//! The header carries the chunk's identity and its persisted state (generation, version, dirty flag)
//! and is protected by its own CRC-32C. Each block-table entry is `(crc32c: u32, state: u32)`; the
//! state says whether the block holds data or is unwritten (reads as zeros, takes no space). An entry
//! is 8 aligned bytes inside one sector, so it is never torn. The table is allocated when the file is
//! created, so updating it never needs new space; only data blocks do.
//!
//! Every decoder here checks lengths and checksums and returns an error, never panics.

use cairn_types::{BLOCK_SIZE_BYTES, ChunkIndex, ChunkSize, Generation, VolumeId, crc32c};

/// Magic of a chunk file header.
pub const CHUNK_MAGIC: [u8; 8] = *b"CAIRNCK1";
/// Magic of a volume metadata file.
pub const VOLUME_MAGIC: [u8; 8] = *b"CAIRNVL1";
/// Magic of the data directory's identity file.
pub const STORE_MAGIC: [u8; 8] = *b"CAIRNST1";
/// Version of the on-disk format. Bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes of the header that are meaningful; the rest of its block is zero.
pub const HEADER_LEN: usize = 64;
/// Size of the header region.
pub const HEADER_REGION_BYTES: u64 = BLOCK_SIZE_BYTES as u64;
/// Bytes of one block-table entry.
pub const TABLE_ENTRY_LEN: usize = 8;

/// Block-table state of a block that was never written or was trimmed: reads as zeros.
pub const BLOCK_UNWRITTEN: u32 = 0;
/// Block-table state of a block holding data ("DAT1"); any other value is corruption.
pub const BLOCK_DATA: u32 = 0x3154_4144;

const FLAG_DIRTY: u32 = 1;

/// Why a header or metadata file could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("too short: {0} bytes")]
    TooShort(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    #[error("header checksum mismatch")]
    BadChecksum,
    #[error("invalid field: {0}")]
    BadField(&'static str),
}

/// The persisted state of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub volume: VolumeId,
    pub chunk: ChunkIndex,
    pub chunk_size: ChunkSize,
    /// Generation of the last mutation applied.
    pub generation: Generation,
    /// Number of mutations applied to this chunk since it was created.
    pub version: u64,
    /// Sequence number the writer gave the last mutation.
    pub last_sequence: u64,
    /// Set (durably) before the first mutation after a flush; cleared after the flush made it durable.
    pub dirty: bool,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&CHUNK_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_size.bytes().to_le_bytes());
        b[16..24].copy_from_slice(&self.volume.get().to_le_bytes());
        b[24..32].copy_from_slice(&self.chunk.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.generation.0.to_le_bytes());
        b[40..48].copy_from_slice(&self.version.to_le_bytes());
        b[48..56].copy_from_slice(&self.last_sequence.to_le_bytes());
        let flags = if self.dirty { FLAG_DIRTY } else { 0 };
        b[56..60].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < HEADER_LEN {
            return Err(FormatError::TooShort(b.len()));
        }
        if b[0..8] != CHUNK_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if le_u32(&b[60..64]) != crc32c(&b[0..60]) {
            return Err(FormatError::BadChecksum);
        }
        let version = le_u32(&b[8..12]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let flags = le_u32(&b[56..60]);
        if flags & !FLAG_DIRTY != 0 {
            return Err(FormatError::BadField("flags"));
        }
        Ok(ChunkHeader {
            chunk_size: ChunkSize::new(le_u32(&b[12..16]))
                .map_err(|_| FormatError::BadField("chunk size"))?,
            volume: VolumeId::new(le_u64(&b[16..24])).map_err(|_| FormatError::BadField("volume id"))?,
            chunk: ChunkIndex(le_u64(&b[24..32])),
            generation: Generation(le_u64(&b[32..40])),
            version: le_u64(&b[40..48]),
            last_sequence: le_u64(&b[48..56]),
            dirty: flags & FLAG_DIRTY != 0,
        })
    }
}

/// Size of the block-table region of a chunk of `chunk_size`, rounded up to whole blocks.
pub fn table_region_bytes(chunk_size: ChunkSize) -> u64 {
    let raw = u64::from(chunk_size.blocks()) * TABLE_ENTRY_LEN as u64;
    raw.div_ceil(u64::from(BLOCK_SIZE_BYTES)) * u64::from(BLOCK_SIZE_BYTES)
}

/// File offset of the block table.
pub fn table_offset() -> u64 {
    HEADER_REGION_BYTES
}

/// File offset of the data region.
pub fn data_offset(chunk_size: ChunkSize) -> u64 {
    HEADER_REGION_BYTES + table_region_bytes(chunk_size)
}

/// Total length of a chunk file (the data region is sparse until written).
pub fn chunk_file_len(chunk_size: ChunkSize) -> u64 {
    data_offset(chunk_size) + u64::from(chunk_size.bytes())
}

/// One block-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableEntry {
    pub crc: u32,
    pub state: u32,
}

impl TableEntry {
    pub const UNWRITTEN: TableEntry = TableEntry { crc: 0, state: BLOCK_UNWRITTEN };

    pub fn data(crc: u32) -> Self {
        TableEntry { crc, state: BLOCK_DATA }
    }

    pub fn encode_into(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.crc.to_le_bytes());
        out[4..8].copy_from_slice(&self.state.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Self {
        TableEntry { crc: le_u32(&b[0..4]), state: le_u32(&b[4..8]) }
    }
}

/// The persisted state of a volume on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeMeta {
    pub volume: VolumeId,
    /// Highest writer generation this node has accepted for the volume.
    pub highest_generation: Generation,
}

/// Length of an encoded [`VolumeMeta`].
pub const VOLUME_META_LEN: usize = 32;

impl VolumeMeta {
    pub fn encode(&self) -> [u8; VOLUME_META_LEN] {
        let mut b = [0u8; VOLUME_META_LEN];
        b[0..8].copy_from_slice(&VOLUME_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.volume.get().to_le_bytes());
        b[20..28].copy_from_slice(&self.highest_generation.0.to_le_bytes());
        let crc = crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < VOLUME_META_LEN {
            return Err(FormatError::TooShort(b.len()));
        }
        if b[0..8] != VOLUME_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if le_u32(&b[28..32]) != crc32c(&b[0..28]) {
            return Err(FormatError::BadChecksum);
        }
        let version = le_u32(&b[8..12]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        Ok(VolumeMeta {
            volume: VolumeId::new(le_u64(&b[12..20])).map_err(|_| FormatError::BadField("volume id"))?,
            highest_generation: Generation(le_u64(&b[20..28])),
        })
    }
}

/// Contents of the data directory's identity file `cairn-store`: magic and format version.
pub fn encode_store_identity() -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&STORE_MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c(&b[0..12]);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_store_identity(b: &[u8]) -> Result<(), FormatError> {
    if b.len() != 16 {
        return Err(FormatError::TooShort(b.len()));
    }
    if b[0..8] != STORE_MAGIC {
        return Err(FormatError::BadMagic);
    }
    if le_u32(&b[12..16]) != crc32c(&b[0..12]) {
        return Err(FormatError::BadChecksum);
    }
    match le_u32(&b[8..12]) {
        FORMAT_VERSION => Ok(()),
        v => Err(FormatError::UnsupportedVersion(v)),
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trip(v in 1u64.., c in any::<u64>(), g in any::<u64>(), ver in any::<u64>(),
                             seq in any::<u64>(), dirty in any::<bool>(), shift in 16u32..=26) {
            let h = ChunkHeader {
                volume: VolumeId::new(v).unwrap(),
                chunk: ChunkIndex(c),
                chunk_size: ChunkSize::new(1 << shift).unwrap(),
                generation: Generation(g),
                version: ver,
                last_sequence: seq,
                dirty,
            };
            prop_assert_eq!(ChunkHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = ChunkHeader::decode(&bytes);
            let _ = VolumeMeta::decode(&bytes);
            let _ = decode_store_identity(&bytes);
        }

        #[test]
        fn any_flipped_header_bit_is_detected(bit in 0usize..(60 * 8)) {
            let h = ChunkHeader {
                volume: VolumeId::new(3).unwrap(), chunk: ChunkIndex(9), chunk_size: ChunkSize::DEFAULT,
                generation: Generation(4), version: 10, last_sequence: 11, dirty: true,
            };
            let mut b = h.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(ChunkHeader::decode(&b).is_err());
        }
    }

    #[test]
    fn layout_of_default_chunk() {
        // 256 blocks × 8 bytes = 2 KiB of table, padded to one block.
        assert_eq!(table_region_bytes(ChunkSize::DEFAULT), 4096);
        assert_eq!(data_offset(ChunkSize::DEFAULT), 8192);
        assert_eq!(chunk_file_len(ChunkSize::DEFAULT), 8192 + (1 << 20));
    }
}
