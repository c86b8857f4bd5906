//! Helpers shared by the store's integration tests.

/// Fills `out` with the content of a block made from `seed` (xorshift); seed 0 is the zero block.
pub fn block_bytes(seed: u64, out: &mut [u8]) {
    if seed == 0 {
        out.fill(0);
        return;
    }
    let mut x = seed;
    for word in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
}
