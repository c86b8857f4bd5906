//! The block checksum: CRC-32C (Castagnoli), computed over one 4 KiB block.
//!
//! The writer computes it, the storage node verifies it before storing and again on every read, and the
//! reader verifies it once more. CRC-32C is hardware accelerated on x86_64 (SSE4.2) and aarch64.

use crate::limits::BLOCK_SIZE_BYTES;

/// CRC-32C (iSCSI polynomial) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    // crc-fast returns the 32-bit CRC widened to u64; the high half is always zero.
    (crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) & 0xffff_ffff) as u32
}

/// The checksum of a block of zeros, which is what a never-written block reads as.
pub fn zero_block_crc32c() -> u32 {
    static ZERO: [u8; BLOCK_SIZE_BYTES as usize] = [0; BLOCK_SIZE_BYTES as usize];
    crc32c(&ZERO)
}

/// Checksums of every whole block of `data` (whose length must be a multiple of the block size).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    assert!(data.len().is_multiple_of(BLOCK_SIZE_BYTES as usize), "data is not whole blocks");
    data.chunks_exact(BLOCK_SIZE_BYTES as usize).map(crc32c).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The catalogue's check value for CRC-32/ISCSI.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn zero_block_matches() {
        assert_eq!(zero_block_crc32c(), crc32c(&[0u8; 4096]));
    }
}
